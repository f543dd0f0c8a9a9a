// The chat page: a key, a model, a conversation streamed from /v1/chat/completions.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const keyInput = $("key"), modelSelect = $("model"), messages = $("messages");
  const prompt = $("prompt"), status = $("status"), send = $("send");
  let history = [];

  const headers = () => ({
    "Authorization": "Bearer " + keyInput.value.trim(),
    "Content-Type": "application/json",
  });
  const say = (text) => { status.textContent = text; };
  // Amounts are exact decimal strings ("0.000001234"): subtract them as integer
  // nano-dollars, never as floats, and write the result as the server does.
  const nanos = (usd) => {
    const [whole, frac = ""] = String(usd).split(".");
    return BigInt(whole) * 1000000000n + BigInt((frac + "000000000").slice(0, 9));
  };
  const usdOf = (n) => {
    const sign = n < 0n ? "-" : "";
    const abs = n < 0n ? -n : n;
    let text = (abs / 1000000000n) + "." + String(abs % 1000000000n).padStart(9, "0");
    text = text.replace(/0+$/, "");
    return sign + (text.endsWith(".") ? text + "0" : text);
  };

  async function usage() {
    const r = await fetch("/v1/usage", { headers: headers(), cache: "no-store" });
    return r.ok ? r.json() : null;
  }

  async function loadModels() {
    if (!keyInput.value.trim()) return;
    sessionStorage.setItem("tokenwell-key", keyInput.value.trim());
    const r = await fetch("/v1/models", { headers: headers() });
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      say((body.error && body.error.message) || ("HTTP " + r.status));
      modelSelect.innerHTML = "";
      return;
    }
    const models = (await r.json()).data.map((m) => m.id);
    const chosen = sessionStorage.getItem("tokenwell-model");
    modelSelect.innerHTML = "";
    for (const id of models) {
      const option = document.createElement("option");
      option.value = option.textContent = id;
      if (id === chosen) option.selected = true;
      modelSelect.appendChild(option);
    }
    say(models.length ? "Ready." : "This key may use no model.");
  }

  function bubble(role, text) {
    const li = document.createElement("li");
    li.className = "msg " + role;
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    li.appendChild(body);
    messages.appendChild(li);
    li.scrollIntoView({ block: "end" });
    return li;
  }

  async function ask(text) {
    history.push({ role: "user", content: text });
    bubble("user", text);
    const answer = bubble("assistant", "");
    const body = answer.querySelector(".text");
    send.disabled = true;
    say("…");
    const before = await usage();
    const started = performance.now();
    let result = { usage: null, error: null, id: null };
    try {
      const r = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: headers(),
        body: JSON.stringify({
          model: modelSelect.value,
          messages: history,
          stream: true,
          stream_options: { include_usage: true },
        }),
      });
      result.id = r.headers.get("x-request-id");
      if (!r.ok) {
        const err = await r.json().catch(() => ({}));
        throw new Error((err.error && err.error.message) || ("HTTP " + r.status));
      }
      const reader = r.body.getReader();
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
          for (const line of block.split("\n")) {
            if (!line.startsWith("data: ")) continue;
            const data = line.slice(6);
            if (data === "[DONE]") continue;
            const chunk = JSON.parse(data);
            if (chunk.error) result.error = chunk.error.message;
            if (chunk.usage) result.usage = chunk.usage;
            for (const choice of chunk.choices || []) {
              if (choice.delta && choice.delta.content) body.textContent += choice.delta.content;
            }
          }
        }
      }
      history.push({ role: "assistant", content: body.textContent });
    } catch (e) {
      history.pop();
      result.error = e.message;
      answer.classList.add("failed");
    }
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    const meta = document.createElement("div");
    meta.className = "meta";
    if (result.error) meta.textContent = "error: " + result.error;
    if (result.usage) {
      let cost = "";
      const deadline = Date.now() + 5000;
      for (;;) {  // the turn's row closes just after the stream: wait for it
        let after = await usage();
        if (!before || !after) break;
        if (after.requests > before.requests || Date.now() > deadline) {
          // Read once more: the count and the spend come from two reads, and the
          // close may have landed between them in the one that saw it.
          after = (await usage()) || after;
          cost = " · $" + usdOf(nanos(after.spend_usd) - nanos(before.spend_usd));
          break;
        }
        await new Promise((done) => setTimeout(done, 100));
      }
      const u = result.usage;
      const cached = (u.prompt_tokens_details && u.prompt_tokens_details.cached_tokens) || 0;
      meta.textContent += (meta.textContent ? " · " : "") + u.prompt_tokens + " prompt" +
        (cached ? " (" + cached + " cached)" : "") + " + " + u.completion_tokens +
        " completion tokens" + cost + " · " + seconds + " s";
    }
    meta.dataset.requestId = result.id || "";
    answer.appendChild(meta);
    send.disabled = false;
    say("Ready.");
    prompt.focus();
  }

  keyInput.value = sessionStorage.getItem("tokenwell-key") || "";
  keyInput.addEventListener("change", loadModels);
  modelSelect.addEventListener("change", () => sessionStorage.setItem("tokenwell-model", modelSelect.value));
  $("reset").addEventListener("click", () => { history = []; messages.innerHTML = ""; say("New conversation."); });
  $("ask").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = prompt.value.trim();
    if (!text || send.disabled) return;
    if (!modelSelect.value) { say("Paste a key and pick a model first."); return; }
    prompt.value = "";
    ask(text);
  });
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("ask").requestSubmit();
    }
  });
  loadModels();
})();
