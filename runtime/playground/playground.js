// edgevlm playground: one image, a conversation about it, answers streamed from POST /v1/chat/completions.
// Plain browser JavaScript, no build step; it talks only to the server that served it.
"use strict";

(() => {
  const MAX_SIDE = 1536; // a larger image is scaled down in the browser before it is sent
  const $ = (id) => document.getElementById(id);

  let image = null; // {url: data URL sent to the server, note: what the page says about it}
  let messages = []; // the conversation so far, as OpenAI messages; the image rides in the first user turn
  let model = null; // from GET /v1/models
  let controller = null; // the running request's AbortController
  let conversationId = 0; // bumped by a new conversation: an answer still arriving for an old one is dropped

  // ---------------------------------------------------------------- small helpers

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = $("api-key").value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  function showError(text) {
    $("error").textContent = text;
    $("error").hidden = false;
  }

  function clearError() {
    $("error").textContent = "";
    $("error").hidden = true;
  }

  function setStatus(state, text) {
    $("status").dataset.state = state;
    $("status").textContent = text;
  }

  // An HTTP error's text: the OpenAI-style {"error": {"message": ...}} when the body has one.
  async function errorText(response) {
    let body = "";
    try {
      body = await response.text();
      const parsed = JSON.parse(body);
      if (parsed && parsed.error && parsed.error.message) return `${response.status}: ${parsed.error.message}`;
    } catch (e) {
      // not JSON: fall through to the raw text
    }
    return `${response.status} ${response.statusText}` + (body ? ": " + body.slice(0, 500) : "");
  }

  // ---------------------------------------------------------------- the model's name

  async function loadModel() {
    try {
      const response = await fetch("/v1/models", { headers: headers() });
      if (!response.ok) {
        $("model").textContent = "unknown";
        const hint = response.status === 401 ? " (type the server's API key under Settings)" : "";
        showError("Could not list the models: " + (await errorText(response)) + hint);
        return;
      }
      const body = await response.json();
      model = body.data && body.data.length ? body.data[0].id : null;
      $("model").textContent = model || "none";
      if ($("error").textContent.startsWith("Could not list")) clearError();
    } catch (e) {
      $("model").textContent = "unknown";
      showError("Cannot reach the server: " + e.message);
    }
  }

  // ---------------------------------------------------------------- the image

  function readAsDataURL(blob) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(blob);
    });
  }

  function decode(url) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => reject(new Error("the browser cannot read this image"));
      img.src = url;
    });
  }

  // PNG and JPEG files within MAX_SIDE are sent as they are; anything larger, or in another format, is drawn
  // onto a canvas (on white, for transparent images) at most MAX_SIDE on its long side and sent as JPEG.
  async function useFile(file) {
    clearError();
    if (!file || !file.type.startsWith("image/")) {
      showError("Not an image: " + (file ? file.name || file.type : "nothing"));
      return;
    }
    const objectUrl = URL.createObjectURL(file);
    try {
      const img = await decode(objectUrl);
      const w = img.naturalWidth, h = img.naturalHeight;
      const scale = Math.min(1, MAX_SIDE / Math.max(w, h));
      const info = $("image-info");
      let url, note;
      if (scale === 1 && (file.type === "image/png" || file.type === "image/jpeg")) {
        url = await readAsDataURL(file);
        note = `${w}\u00d7${h}, sent as it is`;
        info.dataset.width = w;
        info.dataset.height = h;
      } else {
        const cw = Math.max(1, Math.round(w * scale)), ch = Math.max(1, Math.round(h * scale));
        const canvas = document.createElement("canvas");
        canvas.width = cw;
        canvas.height = ch;
        const ctx = canvas.getContext("2d");
        ctx.fillStyle = "#fff";
        ctx.fillRect(0, 0, cw, ch);
        ctx.imageSmoothingQuality = "high";
        ctx.drawImage(img, 0, 0, cw, ch);
        url = canvas.toDataURL("image/jpeg", 0.9);
        note = scale < 1 ? `${w}\u00d7${h}, resized to ${cw}\u00d7${ch} JPEG` : `${w}\u00d7${h}, sent as JPEG`;
        info.dataset.width = cw;
        info.dataset.height = ch;
      }
      const kb = Math.round((url.length * 3) / 4 / 1024);
      setImage({ url, note: `${file.name || "pasted image"}: ${note} (${kb} KB)` });
    } catch (e) {
      showError(`Could not read ${file.name || "the image"}: ${e.message}`);
    } finally {
      URL.revokeObjectURL(objectUrl);
    }
  }

  function setImage(value) {
    image = value;
    $("preview").hidden = !image;
    $("drop-hint").hidden = !!image;
    if (image) $("preview").src = image.url;
    else $("preview").removeAttribute("src");
    $("image-info").textContent = image ? image.note : "";
    $("clear-image").disabled = !image;
    newConversation(); // questions are about one image: a new one starts over
  }

  // ---------------------------------------------------------------- the conversation

  function newConversation() {
    if (controller) controller.abort();
    conversationId += 1;
    messages = [];
    $("conversation").replaceChildren();
    setStatus("idle", "ready");
  }

  function addTurn(role, text, imageUrl) {
    const div = document.createElement("div");
    div.className = "turn " + role;
    if (imageUrl) {
      const img = document.createElement("img");
      img.src = imageUrl;
      img.alt = "the image";
      div.append(img);
    }
    if (text) div.append(document.createTextNode(text));
    $("conversation").append(div);
    $("conversation").scrollTop = $("conversation").scrollHeight;
    return div;
  }

  // The request's body from the settings; throws an Error with a message for the user when one is invalid.
  function requestBody(conversation) {
    const body = { messages: conversation, stream: true, stream_options: { include_usage: true } };
    if (model) body.model = model;
    const temperature = $("temperature").value.trim();
    if (temperature !== "") body.temperature = Number(temperature);
    const maxTokens = $("max-tokens").value.trim();
    if (maxTokens !== "") body.max_tokens = Number(maxTokens);
    const schemaText = $("schema").value.trim();
    if (schemaText) {
      let schema;
      try {
        schema = JSON.parse(schemaText);
      } catch (e) {
        throw new Error("The JSON schema is not valid JSON: " + e.message);
      }
      if (!schema || typeof schema !== "object" || Array.isArray(schema)) {
        throw new Error("The JSON schema must be a JSON object, such as {\"type\": \"object\", ...}");
      }
      body.response_format = { type: "json_schema", json_schema: { name: "answer", schema } };
    }
    return body;
  }

  // Reads a text/event-stream body, calling onData with each event's data (the "data:" lines, joined).
  async function readEvents(response, onData) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", data = [];
    for (;;) {
      const { value, done } = await reader.read();
      buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
      const lines = buffer.split(/\r\n|\r|\n/);
      buffer = done ? "" : lines.pop(); // the last piece may be a line still arriving
      for (const line of lines) {
        if (line === "") {
          if (data.length && onData(data.join("\n")) === false) {
            reader.cancel().catch(() => {});
            return;
          }
          data = [];
        } else if (line.startsWith("data:")) {
          data.push(line.slice(5).replace(/^ /, ""));
        } // comments (":...") and other fields are ignored
      }
      if (done) {
        if (data.length) onData(data.join("\n"));
        return;
      }
    }
  }

  async function send(event) {
    event.preventDefault();
    if (controller) return;
    clearError();
    const question = $("question").value.trim();
    if (!question) {
      showError("Type a question first.");
      return;
    }
    const first = messages.length === 0;
    const userTurn = first && image
      ? { role: "user", content: [{ type: "image_url", image_url: { url: image.url } }, { type: "text", text: question }] }
      : { role: "user", content: question };
    let body;
    try {
      body = requestBody([...messages, userTurn]);
    } catch (e) {
      showError(e.message);
      return;
    }

    const status = $("status");
    status.dataset.requests = String(Number(status.dataset.requests || 0) + 1); // for tests: one more sent
    const userDiv = addTurn("user", question, first && image ? image.url : null);
    const answerDiv = addTurn("assistant", "");
    const answerText = document.createTextNode("");
    answerDiv.append(answerText);
    $("question").value = "";
    const stats = $("stats");
    stats.dataset.deltas = "0";
    answerDiv.dataset.deltas = "0";
    $("ttft").textContent = $("tps").textContent = $("tokens").textContent = "\u2013";

    controller = new AbortController();
    const id = conversationId;
    $("send").disabled = true;
    $("stop").disabled = false;
    setStatus("waiting", "waiting for the first token\u2026");

    const start = performance.now();
    let firstAt = null, lastAt = null, deltas = 0, usage = null, streamError = null, finish = null, answer = "";

    const onData = (data) => {
      if (data === "[DONE]") return false;
      let chunk;
      try {
        chunk = JSON.parse(data);
      } catch (e) {
        streamError = "unreadable event from the server: " + data.slice(0, 200);
        return false;
      }
      if (chunk.error) {
        streamError = chunk.error.message || JSON.stringify(chunk.error);
        return true; // [DONE] follows
      }
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) return true;
      if (choice.finish_reason) finish = choice.finish_reason;
      if (firstAt !== null) lastAt = performance.now(); // a token's step ends with its chunk, or the finish one
      const text = choice.delta && choice.delta.content;
      if (text) {
        const now = performance.now();
        if (firstAt === null) {
          firstAt = now;
          $("ttft").textContent = ((now - start) / 1000).toFixed(2) + " s";
          setStatus("streaming", "streaming\u2026");
        }
        lastAt = now;
        deltas += 1;
        answer += text;
        answerText.data = answer.replace(/^\s+/, ""); // the tokenizer's leading space, not worth showing
        stats.dataset.deltas = answerDiv.dataset.deltas = String(deltas);
        $("tokens").textContent = String(deltas);
        $("conversation").scrollTop = $("conversation").scrollHeight;
      }
      return true;
    };

    let outcome = "done";
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
      });
      if (!response.ok) {
        streamError = await errorText(response);
      } else {
        await readEvents(response, onData);
        if (!streamError && finish === null) streamError = "the stream ended before the answer did";
      }
    } catch (e) {
      if (e.name === "AbortError") outcome = "stopped";
      else streamError = "Cannot reach the server: " + e.message;
    } finally {
      controller = null;
      $("send").disabled = false;
      $("stop").disabled = true;
    }
    if (id !== conversationId) return; // a new conversation began meanwhile: this answer belongs to none
    if (streamError && outcome !== "stopped") outcome = "error";

    // tokens/s over the decoding, as `edgevlm chat` reports it: the tokens after the first, over the time since it.
    const tokens = usage ? usage.completion_tokens : deltas;
    $("tokens").textContent = String(tokens);
    if (firstAt !== null && tokens > 1 && lastAt > firstAt) {
      $("tps").textContent = ((tokens - 1) / ((lastAt - firstAt) / 1000)).toFixed(1);
    }

    // A failed request, or one stopped before its first token, is not part of the conversation: its question goes
    // back into the box, to edit and send again.
    if (outcome === "error" || (outcome === "stopped" && !answer)) {
      if (outcome === "error") showError("The request failed: " + streamError);
      userDiv.classList.add("failed");
      answerDiv.classList.add("failed");
      if (!answer) answerDiv.remove();
      $("question").value = question;
      setStatus(outcome, outcome === "error" ? "failed" : "stopped before the first token");
      return;
    }
    if (outcome === "stopped") {
      const note = document.createElement("span");
      note.className = "note";
      note.textContent = " (stopped)";
      answerDiv.append(note);
      setStatus("stopped", "stopped");
    } else {
      setStatus("done", finish === "length" ? "done (max tokens reached)" : "done");
    }
    // What the page shows is what the next question sends: the question and the answer as far as it got.
    messages.push(userTurn, { role: "assistant", content: answer });
  }

  // ---------------------------------------------------------------- wiring

  document.addEventListener("DOMContentLoaded", () => {
    const drop = $("drop");
    $("file").addEventListener("change", () => {
      if ($("file").files.length) useFile($("file").files[0]);
    });
    drop.addEventListener("dragover", (e) => {
      e.preventDefault();
      drop.classList.add("over");
    });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("over");
      const file = [...e.dataTransfer.files].find((f) => f.type.startsWith("image/"));
      if (file) useFile(file);
      else showError("Drop an image file.");
    });
    document.addEventListener("paste", (e) => {
      const item = [...(e.clipboardData ? e.clipboardData.items : [])].find(
        (i) => i.kind === "file" && i.type.startsWith("image/"));
      if (item) {
        e.preventDefault();
        useFile(item.getAsFile());
      }
    });
    $("clear-image").addEventListener("click", () => {
      $("file").value = "";
      setImage(null);
    });
    $("ask").addEventListener("submit", send);
    $("question").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        $("ask").requestSubmit();
      }
    });
    $("stop").addEventListener("click", () => {
      if (controller) controller.abort();
    });
    $("new-chat").addEventListener("click", () => {
      newConversation();
      clearError();
    });
    let typing = null; // list the models again once the key has been typed (or pasted)
    $("api-key").addEventListener("input", () => {
      clearTimeout(typing);
      typing = setTimeout(loadModel, 400);
    });
    loadModel();
  });
})();
