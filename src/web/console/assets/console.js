// leasehold's console: the only script. Pages work without it; with it, the queue table
// follows the server's live updates (server-sent events on /events).
"use strict";

(function () {
  const rows = document.getElementById("queue-rows");
  if (!rows || !window.EventSource) {
    return;
  }
  const events = new EventSource("/events");
  events.addEventListener("queues", (event) => {
    // Keep what the operator is typing into a cap field: skip the refresh while one has focus.
    if (rows.contains(document.activeElement) && document.activeElement.tagName === "INPUT") {
      return;
    }
    rows.innerHTML = event.data;
    document.body.dataset.liveUpdates = String(Number(document.body.dataset.liveUpdates || 0) + 1);
  });
})();
