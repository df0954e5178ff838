// dpokit label: the page's logic. Model text is only ever written with textContent (never innerHTML), so an
// answer containing <script> or markup shows as text. No external resources: works offline.
"use strict";

(() => {
  const params = new URLSearchParams(location.search);
  const token = params.get("token") || "";
  let annotator = (params.get("annotator") || "").trim();
  let current = null;  // the item shown: {id, prompt, left, right}
  let busy = false;    // one request at a time: a key pressed twice never answers twice

  const $ = (selector) => document.querySelector(selector);
  const setState = (state) => { document.body.dataset.state = state; };
  const setStatus = (text) => { $('[data-role="status"]').textContent = text || ""; };

  function contentText(content) {
    // text, or a vision prompt's parts: text parts as they are, each image part as [image N]
    if (!Array.isArray(content)) return String(content);
    let n = 0;
    return content.map((part) => part && part.type === "image" ? `[image ${++n}] ` : String(part.text ?? "")).join("");
  }

  function renderPrompt(el, prompt) {
    el.replaceChildren();
    if (typeof prompt === "string") { el.textContent = prompt; return; }
    for (const message of prompt) {  // a list of {role, content} messages
      const line = document.createElement("div");
      const role = document.createElement("span");
      role.className = "role";
      role.textContent = String(message.role) + ":";
      line.append(role, document.createTextNode(contentText(message.content)));
      el.append(line);
    }
  }

  function renderImages(el, images) {
    // the prompt's pictures (vision items): data: URIs from the server, never a path the page chose
    el.replaceChildren();
    (images || []).forEach((image, i) => {
      const figure = document.createElement("figure");
      const caption = document.createElement("figcaption");
      caption.textContent = `image ${i + 1}`;
      if (typeof image.src === "string" && image.src.startsWith("data:image/")) {
        const img = document.createElement("img");
        img.src = image.src;
        img.alt = String(image.alt || `prompt image ${i + 1}`);
        img.dataset.role = "prompt-image";
        figure.append(img);
      } else {
        const missing = document.createElement("span");
        missing.className = "missing";
        missing.textContent = String(image.missing || "image missing");
        figure.append(missing);
      }
      figure.append(caption);
      el.append(figure);
    });
    el.hidden = !(images && images.length);
  }

  function show(data) {
    const p = data.progress;
    $('[data-role="progress"]').textContent =
      `${p.answered} answered by you · ${p.remaining} left for you · ${p.complete}/${p.items} items done` +
      (p.overlap > 1 ? ` (${p.overlap} people each)` : "");
    current = data.item;
    $('[data-role="task"]').hidden = current === null;
    $('[data-role="done"]').hidden = current !== null;
    if (current === null) {
      delete document.body.dataset.item;
      setState("done");
      return;
    }
    renderImages($('[data-role="images"]'), current.images);
    renderPrompt($('[data-role="prompt"]'), current.prompt);
    $('[data-side="left"]').textContent = current.left;
    $('[data-side="right"]').textContent = current.right;
    document.body.dataset.item = String(current.id);
    setState("ready");
  }

  async function call(action, body) {
    const response = await fetch("/api/" + action, {
      method: "POST",
      headers: {"Content-Type": "application/json", "X-Label-Token": token},
      body: JSON.stringify({annotator, ...body}),
    });
    let data;
    try { data = await response.json(); } catch { data = {error: `server answered ${response.status}`}; }
    return {status: response.status, data};
  }

  async function act(action, body = {}) {
    if (busy) return;
    busy = true;
    setState("loading");
    try {
      let {status, data} = await call(action, body);
      if (status === 409) {  // answered in another tab meanwhile: say so and move on
        setStatus(data.error);
        ({status, data} = await call("next", {}));
      } else {
        setStatus("");
      }
      if (status === 200) {
        show(data);
        if (action === "answer") $('[data-role="reason"]').value = "";
      } else {
        setStatus(data.error);
        setState("error");
      }
    } catch (err) {
      setStatus("The server cannot be reached; this answer was not saved. Try again.");
      setState("error");
    } finally {
      busy = false;
    }
  }

  function press(key) {
    if (key === "u") { act("undo"); return; }
    if (current === null) return;
    const choice = {"1": "left", "2": "right", "t": "tie", "s": "skip"}[key];
    if (choice) act("answer", {item: current.id, choice, reason: $('[data-role="reason"]').value});
  }

  function start() {
    $('[data-role="annotator"]').textContent = annotator;
    $('[data-role="name-form"]').hidden = true;
    act("next");
  }

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const target = event.target;
    if (target instanceof HTMLTextAreaElement || target instanceof HTMLInputElement) {
      if (event.key === "Escape") target.blur();
      return;  // typing a reason or a name never answers
    }
    if (!annotator) return;
    const key = event.key.toLowerCase();
    if (["1", "2", "t", "s", "u"].includes(key)) {
      event.preventDefault();
      press(key);
    }
  });

  document.addEventListener("DOMContentLoaded", () => {
    for (const button of document.querySelectorAll("button[data-key]")) {
      button.addEventListener("click", () => press(button.dataset.key));
    }
    $('[data-role="name-form"]').addEventListener("submit", (event) => {
      event.preventDefault();
      annotator = $('[data-role="name"]').value.trim();
      if (!annotator) return;
      params.set("annotator", annotator);
      history.replaceState(null, "", "?" + params.toString());  // a reload keeps the name (and the token)
      start();
    });
    if (annotator) {
      start();
    } else {
      setState("name");
      $('[data-role="name-form"]').hidden = false;
      $('[data-role="name"]').focus();
    }
  });
})();
