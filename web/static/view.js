// pipeline view: the live transcript (server-sent events) and the recorded calls, loaded
// when asked for. No framework; everything the server sends as text is shown as text.
"use strict";

(function () {
  function pre(value) {
    const block = document.createElement("pre");
    block.textContent = typeof value === "string" ? value : JSON.stringify(value, null, 2);
    return block;
  }

  function heading(text) {
    const h = document.createElement("h4");
    h.textContent = text;
    return h;
  }

  function showCalls(target, calls) {
    target.replaceChildren();
    if (!calls.length) {
      target.textContent = "No call recorded.";
      return;
    }
    for (const call of calls) {
      const box = document.createElement("div");
      box.className = "call-record";
      const model = call.request && call.request.model ? " · " + call.request.model : "";
      box.append(heading("call " + call.number + model + (call.time ? " · " + call.time : "")));
      box.append(heading("request"), pre(call.request || {}));
      if (call.stream) {
        const text = (call.stream.pieces || []).join("");
        box.append(heading("response (streamed, " + (call.stream.finish_reason || "no finish reason") + ")"), pre(text));
        if (call.stream.tool_calls) box.append(heading("tool calls"), pre(call.stream.tool_calls));
      }
      if (call.response) box.append(heading("response"), pre(call.response));
      if (call.error) box.append(heading("error"), pre(call.error));
      if (call.usage) box.append(heading("usage"), pre(call.usage));
      if (call.unreadable) box.append(heading("unreadable"), pre(call.unreadable));
      target.append(box);
    }
  }

  function load(details) {
    details.dataset.loaded = "1";
    const target = details.querySelector(".loaded");
    target.textContent = "loading...";
    fetch(details.dataset.src, { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.json() : Promise.reject(new Error("HTTP " + r.status)); })
      .then(function (calls) { showCalls(target, calls); })
      .catch(function (e) { target.textContent = "could not load the calls: " + e.message; delete details.dataset.loaded; });
  }

  // <details> elements: toggle does not bubble, so listen while it is captured
  document.addEventListener("toggle", function (event) {
    const d = event.target;
    if (d instanceof HTMLDetailsElement && d.open && d.dataset.src && !d.dataset.loaded) load(d);
  }, true);

  function follow(transcript) {
    const count = Number(transcript.dataset.count || "0");
    const source = new EventSource(transcript.dataset.live + "?after=" + count);
    const note = document.getElementById("live-note");
    source.addEventListener("open", function () { transcript.dataset.connected = "1"; });
    source.addEventListener("turn", function (event) {
      const data = JSON.parse(event.data);
      if (document.getElementById("turn-" + data.turn)) return;
      transcript.insertAdjacentHTML("beforeend", data.html);
      const added = transcript.lastElementChild;
      if (added) added.classList.add("arrived");
      const empty = document.getElementById("no-turns");
      if (empty) empty.remove();
    });
    source.addEventListener("end", function (event) {
      source.close();
      const data = JSON.parse(event.data);
      const badge = document.getElementById("run-status");
      if (badge) {
        badge.textContent = data.status;
        badge.className = "badge status-" + data.status;
      }
      for (const [name, status] of Object.entries(data.stages || {})) {
        const stage = document.querySelector('.badge[data-stage="' + CSS.escape(name) + '"]');
        if (stage) {
          stage.textContent = status;
          stage.className = "badge status-" + status;
        }
      }
      if (note) note.textContent = "the run stopped (" + data.status + "); reload for its verdict and files";
      transcript.dataset.ended = "1";
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    const transcript = document.getElementById("transcript");
    if (transcript && transcript.dataset.live) follow(transcript);
  });
})();
