// The chat playground: streams from /v1/chat/completions (the same route every client uses),
// renders Markdown sanitised by DOMPurify, reasoning in a collapsible block, tool calls as
// such. The conversation lives in this page only; Stop aborts the request, and the server
// stops generating when its client leaves.
"use strict";

(function () {
  let messages = [];
  let controller = null;

  const $ = (id) => document.getElementById(id);

  function render(markdown) {
    const html = marked.parse(markdown, { gfm: true, breaks: true });
    return DOMPurify.sanitize(html, { USE_PROFILES: { html: true } });
  }

  function bubble(role) {
    const div = document.createElement("article");
    div.className = "msg msg-" + role;
    div.setAttribute("aria-label", role === "user" ? "You" : "Assistant");
    $("chat-log").appendChild(div);
    return div;
  }

  function showUser(text) {
    const div = bubble("user");
    const p = document.createElement("p");
    p.textContent = text;
    div.appendChild(p);
  }

  function setBusy(busy) {
    $("chat-send").disabled = busy;
    $("chat-stop").disabled = !busy;
  }

  function showError(message) {
    const error = $("chat-error");
    error.textContent = message || "";
    error.hidden = !message;
  }

  // Server-sent events from a fetch body: "data: {...}" lines, blank-line separated.
  async function* events(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = block
          .split(/\r?\n/)
          .filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).trim())
          .join("\n");
        if (data) yield data;
      }
    }
  }

  async function send(text) {
    showError("");
    const model = $("chat-model").value;
    const system = $("chat-system").value.trim();
    messages.push({ role: "user", content: text });
    showUser(text);
    const out = bubble("assistant");
    const thinking = document.createElement("details");
    thinking.className = "reasoning";
    thinking.hidden = true;
    const summary = document.createElement("summary");
    summary.textContent = "Reasoning";
    const reasoningText = document.createElement("div");
    reasoningText.className = "reasoning-text";
    thinking.append(summary, reasoningText);
    const body = document.createElement("div");
    body.className = "answer";
    const tools = document.createElement("div");
    tools.className = "tool-calls";
    const stats = document.createElement("p");
    stats.className = "stats";
    out.append(thinking, body, tools, stats);

    const body_ = {
      model,
      messages: (system ? [{ role: "system", content: system }] : []).concat(messages),
      stream: true,
      stream_options: { include_usage: true },
    };
    const temperature = parseFloat($("chat-temperature").value);
    if (!Number.isNaN(temperature)) body_.temperature = temperature;
    const maxTokens = parseInt($("chat-max-tokens").value, 10);
    if (!Number.isNaN(maxTokens)) body_.max_tokens = maxTokens;

    controller = new AbortController();
    setBusy(true);
    const started = performance.now();
    let first = null;
    let text_ = "";
    let reasoning = "";
    let usage = null;
    let finish = null;
    const calls = [];
    let stopped = false;
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: Object.assign({ "Content-Type": "application/json" }, window.mlxConsole.authHeaders()),
        body: JSON.stringify(body_),
        signal: controller.signal,
      });
      if (!response.ok) {
        let reason = "HTTP " + response.status;
        try {
          reason = (await response.json()).error.message;
        } catch (e) {}
        throw new Error(reason);
      }
      for await (const data of events(response)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          const delta = choice.delta || {};
          if (first === null && (delta.content || delta.reasoning_content || delta.tool_calls)) {
            first = performance.now();
          }
          if (delta.reasoning_content) {
            reasoning += delta.reasoning_content;
            thinking.hidden = false;
            reasoningText.textContent = reasoning;
          }
          if (delta.content) {
            text_ += delta.content;
            body.innerHTML = render(text_);
          }
          for (const call of delta.tool_calls || []) {
            const at = call.index || 0;
            calls[at] = calls[at] || { id: call.id, name: "", arguments: "" };
            if (call.function && call.function.name) calls[at].name = call.function.name;
            if (call.function && call.function.arguments) calls[at].arguments += call.function.arguments;
          }
          if (calls.length) showCalls(tools, calls);
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    } catch (e) {
      if (e.name === "AbortError") {
        stopped = true;
      } else {
        showError(e.message);
      }
    } finally {
      controller = null;
      setBusy(false);
    }
    const assistant = { role: "assistant", content: text_ };
    if (calls.length) {
      assistant.tool_calls = calls.map((c) => ({
        id: c.id,
        type: "function",
        function: { name: c.name, arguments: c.arguments },
      }));
    }
    if (text_ || calls.length) messages.push(assistant);
    const seconds = (performance.now() - started) / 1000;
    const ttft = first === null ? null : (first - started) / 1000;
    const tokens = usage ? usage.completion_tokens : null;
    const parts = [];
    if (ttft !== null) parts.push("first token " + ttft.toFixed(2) + " s");
    if (tokens !== null) {
      const decode = ttft !== null ? seconds - ttft : seconds;
      parts.push(tokens + " tokens");
      if (tokens > 1 && decode > 0) parts.push(((tokens - 1) / decode).toFixed(1) + " tokens/s");
    }
    if (stopped) parts.push("stopped");
    else if (finish) parts.push("finish: " + finish);
    stats.textContent = parts.join(" · ");
  }

  function showCalls(container, calls) {
    container.replaceChildren();
    for (const c of calls) {
      const box = document.createElement("div");
      box.className = "tool-call";
      const title = document.createElement("p");
      title.textContent = "Tool call: " + c.name;
      const args = document.createElement("pre");
      args.textContent = c.arguments;
      box.append(title, args);
      container.appendChild(box);
    }
  }

  document.addEventListener("console:ready", () => {
    const form = $("chat-form");
    const input = $("chat-message");
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const text = input.value.trim();
      if (!text || controller) return;
      input.value = "";
      send(text);
    });
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey) {
        event.preventDefault();
        form.requestSubmit();
      }
    });
    $("chat-stop").addEventListener("click", () => {
      if (controller) controller.abort();
    });
    $("chat-new").addEventListener("click", () => {
      if (controller) controller.abort();
      messages = [];
      $("chat-log").replaceChildren();
      showError("");
      input.focus();
    });
  });
})();
