// Drives the official `openai` npm package against a tokenwire gateway and prints JSON lines.
//
// Usage: node openai_stream.mjs [BASE_URL] [API_KEY] [MODEL]
//   BASE_URL  the gateway's OpenAI base URL, e.g. http://127.0.0.1:8000/v1 (or $TW_BASE_URL)
//   API_KEY   a gateway API key (or $TW_API_KEY)
//   MODEL     the model id (or $TW_MODEL, default "sim")
// Environment:
//   TW_MODE     "stream" (default: streamed with include_usage) or "json" (stream: false)
//   TW_REQUEST  JSON object merged into the request (messages, max_tokens, ...)
//
// Output, one JSON object per line:
//   {"type":"chunk","id","content","finish_reason","usage"}   per streamed chunk
//   {"type":"result","mode","id","ids","text","finish_reason","usage","chunks"}  at the end
//   {"type":"error","status","code","message"}  if the SDK raised (exit status 1)

import OpenAI from "openai";

const [baseURL = process.env.TW_BASE_URL, apiKey = process.env.TW_API_KEY, argModel] =
  process.argv.slice(2);
const model = argModel ?? process.env.TW_MODEL ?? "sim";
const mode = process.env.TW_MODE ?? "stream";
const extra = JSON.parse(process.env.TW_REQUEST ?? "{}");

if (!baseURL || !apiKey) {
  console.error("usage: node openai_stream.mjs BASE_URL API_KEY [MODEL]");
  process.exit(2);
}

const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 20_000 });
const request = {
  model,
  messages: [{ role: "user", content: "hello from node" }],
  ...extra,
};

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

async function streamed() {
  const stream = await client.chat.completions.create({
    ...request,
    stream: true,
    stream_options: { include_usage: true },
  });
  const ids = [];
  let text = "";
  let finishReason = null;
  let usage = null;
  let chunks = 0;
  for await (const chunk of stream) {
    chunks += 1;
    ids.push(chunk.id);
    const choice = chunk.choices[0];
    const content = choice?.delta?.content ?? null;
    if (content) text += content;
    if (choice?.finish_reason) finishReason = choice.finish_reason;
    if (chunk.usage) usage = chunk.usage;
    emit({
      type: "chunk",
      id: chunk.id,
      content,
      finish_reason: choice?.finish_reason ?? null,
      usage: chunk.usage ?? null,
    });
  }
  emit({
    type: "result",
    mode,
    id: ids[0] ?? null,
    ids: [...new Set(ids)],
    text,
    finish_reason: finishReason,
    usage,
    chunks,
  });
}

async function nonStreamed() {
  const completion = await client.chat.completions.create({ ...request, stream: false });
  const choice = completion.choices[0];
  emit({
    type: "result",
    mode,
    id: completion.id,
    ids: [completion.id],
    text: choice.message.content,
    finish_reason: choice.finish_reason,
    usage: completion.usage ?? null,
    chunks: 0,
  });
}

try {
  if (mode === "json") {
    await nonStreamed();
  } else {
    await streamed();
  }
} catch (err) {
  emit({
    type: "error",
    name: err?.constructor?.name ?? "Error",
    status: err?.status ?? null,
    code: err?.code ?? null,
    message: String(err?.message ?? err),
  });
  process.exit(1);
}
