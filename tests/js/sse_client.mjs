// The npm `eventsource` package as an application would use it, driven by
// tests/test_sse_clients.py: follows one stream URL and prints one JSON object
// per line on stdout for everything it sees:
//   {"type":"request","lastEventId":...}   each connection attempt (the header sent)
//   {"type":"open"}                          a 200 text/event-stream answer
//   {"type":"error","readyState":N}          a stream that ended or failed (2 = CLOSED for good)
//   {"type":"event","event":"message","id":...,"data":"..."}
// Exits when its standard input closes.
import { EventSource } from "eventsource";

const url = process.argv[2];
if (!url) {
  process.stderr.write("usage: node sse_client.mjs <events url>\n");
  process.exit(2);
}

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

const source = new EventSource(url, {
  fetch: (input, init) => {
    const headers = new Headers((init && init.headers) || {});
    emit({ type: "request", lastEventId: headers.get("last-event-id") });
    return fetch(input, init);
  },
});

source.addEventListener("open", () => emit({ type: "open" }));
source.addEventListener("error", () => emit({ type: "error", readyState: source.readyState }));
for (const name of ["message", "presence", "reset"]) {
  source.addEventListener(name, (e) => emit({ type: "event", event: name, id: e.lastEventId, data: e.data }));
}

process.stdin.resume();
process.stdin.on("end", () => {
  source.close();
  process.exit(0);
});
