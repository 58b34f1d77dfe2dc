// Drives the `openai` npm package's Responses API against a tokenwire gateway; prints JSON lines.
//
// Usage: node responses_stream.mjs BASE_URL API_KEY [MODEL]   (test: ../test_node_openai.py)
// Environment:
//   TW_MODE     "create" (default: responses.create with stream: true) or "stream" (the
//               responses.stream() helper and its finalResponse())
//   TW_REQUEST  JSON object merged into the request (input, max_output_tokens, ...)
//
// Output, one JSON object per line:
//   {"type":"event","event","sequence_number"}   per streamed event
//   {"type":"result","mode","id","text","status","usage","events"}   at the end
//   {"type":"error","status","code","message"}   if the SDK raised (exit status 1)

import OpenAI from "openai";

const [baseURL, apiKey, model = "sim"] = process.argv.slice(2);
const mode = process.env.TW_MODE ?? "create";
const extra = JSON.parse(process.env.TW_REQUEST ?? "{}");

if (!baseURL || !apiKey) {
  console.error("usage: node responses_stream.mjs BASE_URL API_KEY [MODEL]");
  process.exit(2);
}

const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 20_000 });
const request = { model, input: "hello from node", ...extra };

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

async function main() {
  let text = "";
  let final = null;
  let events = 0;
  const stream =
    mode === "stream"
      ? client.responses.stream(request)
      : await client.responses.create({ ...request, stream: true });
  for await (const event of stream) {
    events += 1;
    emit({ type: "event", event: event.type, sequence_number: event.sequence_number });
    if (event.type === "response.output_text.delta") text += event.delta;
    if (event.type === "response.completed" || event.type === "response.incomplete") {
      final = event.response;
    }
  }
  if (mode === "stream") final = await stream.finalResponse();
  emit({
    type: "result",
    mode,
    id: final?.id ?? null,
    text,
    // raw stream events carry no output_text convenience property: read the output items
    output_text: (final?.output ?? [])
      .filter((item) => item.type === "message")
      .flatMap((item) => item.content.map((part) => part.text))
      .join(""),
    status: final?.status ?? null,
    usage: final?.usage ?? null,
    events,
  });
}

main().catch((err) => {
  emit({
    type: "error",
    status: err?.status ?? null,
    code: err?.code ?? err?.error?.code ?? null,
    message: String(err?.message ?? err),
  });
  process.exit(1);
});
