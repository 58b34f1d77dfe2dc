// A Node `ws` client of /v1/ws/chat in compatible mode, written the way its users write it:
// every message goes through JSON.parse (so a "[DONE]" arriving after close() would throw and
// crash the process), and the socket is closed as soon as a chunk says finish_reason "stop".
//
// Usage: node ws_compat.mjs WS_URL API_KEY
//   WS_URL   e.g. ws://127.0.0.1:8000/v1/ws/chat
//   API_KEY  a gateway API key, sent as "Authorization: Bearer <key>"
// Environment:
//   TW_REQUEST  the chat-completions body to send (JSON)
//
// Output: the concatenated choices[0].delta.content on stdout. Exit status 0 once the socket
// has closed; an exception (e.g. JSON.parse on "[DONE]") exits with 1; 2 on bad usage; 3 on a
// socket error; 4 if nothing finished within 20 s.

import WebSocket from "ws";

const [url, apiKey] = process.argv.slice(2);
if (!url || !apiKey || !process.env.TW_REQUEST) {
  console.error("usage: TW_REQUEST='{...}' node ws_compat.mjs WS_URL API_KEY");
  process.exit(2);
}

const watchdog = setTimeout(() => {
  console.error("timed out");
  process.exit(4);
}, 20_000);
watchdog.unref();

const ws = new WebSocket(url, { headers: { Authorization: `Bearer ${apiKey}` } });

ws.on("open", () => {
  ws.send(process.env.TW_REQUEST);
});

ws.on("message", (data) => {
  const chunk = JSON.parse(data.toString());
  const choice = chunk.choices[0];
  if (choice.delta.content) process.stdout.write(choice.delta.content);
  if (choice.finish_reason === "stop") ws.close();
});

ws.on("error", (err) => {
  console.error(`socket error: ${err.message}`);
  process.exit(3);
});

ws.on("close", (code) => {
  console.error(`closed ${code}`);
});
