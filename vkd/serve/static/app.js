// vkd search page: plain JavaScript, no build step, no external resources.
// Talks to the API of `vkd serve`: GET/POST /search, POST /login, GET /health.
// API paths are relative to the page, so the page also works under `vkd serve --root-path /vkd`.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const el = {
    form: $("search"), q: $("q"), k: $("k"), mode: $("mode"), rerank: $("rerank"), pick: $("pick"), file: $("file"),
    results: $("results"), empty: $("empty"), corpus: $("corpus"), error: $("error"),
    status: $("status"), statusText: $("status-text"), spinner: $("spinner"), timings: $("timings"),
    queryImage: $("query-image"), queryPreview: $("query-preview"), queryName: $("query-name"),
    clearImage: $("clear-image"), dropzone: $("dropzone"),
    login: $("login"), loginForm: $("login-form"), apiKey: $("api-key"), loginError: $("login-error"),
    viewer: $("viewer"), viewerTitle: $("viewer-title"), viewerImg: $("viewer-img"),
    viewerMeta: $("viewer-meta"), viewerPrev: $("viewer-prev"), viewerNext: $("viewer-next"),
    viewerClose: $("viewer-close"),
  };

  const DEFAULT_K = "10";
  const state = {
    current: null,     // the search on screen: {kind: "text", q} or {kind: "image", file, key}
    results: [],       // its results
    controller: null,  // AbortController of the search in flight
    pending: null,     // a search waiting for login
    viewing: -1,       // index in results shown in the viewer
    opener: null,      // element to focus when the viewer closes
    previewUrl: null,
  };
  // Image queries cannot live in the URL; history entries point into this map instead.
  const imageQueries = new Map();
  let imageCounter = 0;

  // -- helpers ------------------------------------------------------------------------

  const fmtScore = (value) => (typeof value === "number" && isFinite(value) ? value.toFixed(3) : "—");
  const fmtMs = (value) => (typeof value === "number" && isFinite(value)
    ? (value >= 100 ? value.toFixed(0) : value >= 10 ? value.toFixed(1) : value.toFixed(2)) + " ms" : "—");

  function make(tag, props = {}, children = []) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (value === undefined || value === null) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key in node && typeof value !== "string") node[key] = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) node.append(child);
    return node;
  }

  // One line from an error body: {"detail": "..."}; FastAPI validation errors give a list.
  function detailOf(body, response) {
    const detail = body && body.detail;
    if (typeof detail === "string" && detail) return detail;
    if (Array.isArray(detail) && detail.length) {
      return detail.map((item) => {
        if (typeof item === "string") return item;
        const where = Array.isArray(item.loc) ? item.loc.filter((p) => p !== "query" && p !== "body").join(".") : "";
        return (where ? where + ": " : "") + (item.msg || JSON.stringify(item));
      }).join("; ");
    }
    if (detail) return JSON.stringify(detail);
    return `${response.status} ${response.statusText || "error"}`.trim();
  }

  async function readJson(response) {
    try { return await response.json(); } catch { return null; }
  }

  function setBusy(busy, text) {
    el.spinner.hidden = !busy;
    el.results.setAttribute("aria-busy", busy ? "true" : "false");
    document.body.classList.toggle("busy", busy);
    if (text !== undefined) el.statusText.textContent = text;
  }

  function showError(message) {
    el.error.textContent = message || "";
    el.error.hidden = !message;
  }

  // -- URL state ------------------------------------------------------------------------

  function paramsFor(search) {
    const params = new URLSearchParams();
    if (search && search.kind === "text") params.set("q", search.q);
    if (el.k.value !== DEFAULT_K) params.set("k", el.k.value);
    if (!el.rerank.checked) params.set("rerank", "false");
    if (el.mode && el.mode.value !== "two-stage") params.set("mode", el.mode.value);
    const candidates = new URLSearchParams(location.search).get("candidates");
    if (candidates) params.set("candidates", candidates);
    return params;
  }

  function remember(search, replace) {
    const params = paramsFor(search);
    const url = location.pathname + (params.toString() ? "?" + params : "");
    const entry = search.kind === "image" ? { image: search.key } : { q: search.q };
    const same = url === location.pathname + location.search && !(search.kind === "image");
    if (replace || same) history.replaceState(entry, "", url);
    else history.pushState(entry, "", url);
  }

  function controlsFromUrl() {
    const params = new URLSearchParams(location.search);
    const k = params.get("k");
    if (k) {
      if (![...el.k.options].some((option) => option.value === k)) el.k.append(make("option", { text: k }));
      el.k.value = k;
    } else {
      el.k.value = DEFAULT_K;
    }
    el.rerank.checked = !/^(false|0|no|off)$/i.test(params.get("rerank") || "");
    if (el.mode) {
      const mode = params.get("mode");
      el.mode.value = [...el.mode.options].some((option) => option.value === mode) ? mode : "two-stage";
    }
    return params;
  }

  function restore() {
    const params = controlsFromUrl();
    const entry = history.state || {};
    if (entry.image && imageQueries.has(entry.image)) {
      runSearch({ kind: "image", file: imageQueries.get(entry.image), key: entry.image }, { push: false });
      return;
    }
    const q = params.get("q");
    if (q && q.trim()) {
      el.q.value = q;
      runSearch({ kind: "text", q: q.trim() }, { push: false });
    } else {
      reset();
    }
  }

  function reset() {
    if (state.controller) state.controller.abort();
    state.current = null;
    state.results = [];
    el.q.value = "";
    clearQueryImage();
    el.results.replaceChildren();
    el.timings.hidden = true;
    el.empty.hidden = false;
    showError("");
    setBusy(false, "");
    document.title = "vkd image search";
  }

  // -- searching ------------------------------------------------------------------------

  function formFields(search) {
    const fields = [["k", el.k.value], ["rerank", el.rerank.checked ? "true" : "false"]];
    if (el.mode && el.mode.value !== "two-stage") fields.push(["mode", el.mode.value]);
    const candidates = new URLSearchParams(location.search).get("candidates");
    if (candidates) fields.push(["candidates", candidates]);
    if (search.kind === "text") fields.unshift(["q", search.q]);
    return fields;
  }

  function request(search, signal) {
    if (search.kind === "text") {
      return fetch("search?" + new URLSearchParams(formFields(search)), {
        signal, credentials: "same-origin", headers: { Accept: "application/json" },
      });
    }
    const body = new FormData();
    body.append("image", search.file, search.file.name || "query.png");
    for (const [key, value] of formFields(search)) body.append(key, value);
    return fetch("search", {
      method: "POST", body, signal, credentials: "same-origin", headers: { Accept: "application/json" },
    });
  }

  async function runSearch(search, { push = true, retries = 0 } = {}) {
    if (state.controller) state.controller.abort();
    const controller = new AbortController();
    state.controller = controller;
    state.current = search;
    if (push) remember(search, false);
    if (search.kind === "image") showQueryImage(search.file); else clearQueryImage();
    document.title = `${search.kind === "text" ? search.q : search.file.name || "image"} – vkd`;

    showError("");
    el.empty.hidden = true;
    setBusy(true, search.kind === "text" ? `Searching for “${search.q}”…` : "Searching with the image…");

    let response;
    try {
      response = await request(search, controller.signal);
    } catch (error) {
      if (controller.signal.aborted) return;
      setBusy(false, "");
      showError("Cannot reach the search server. Is `vkd serve` still running?");
      return;
    }
    if (controller.signal.aborted) return;
    const body = await readJson(response);
    if (controller.signal.aborted) return;

    if (response.status === 401) {
      state.pending = search;
      setBusy(false, "");
      showLogin();
      return;
    }
    if (response.status === 503 && retries < 30) {
      // models still loading: wait and retry
      setBusy(true, (body && typeof body.detail === "string" ? body.detail : "The server is loading its models") + " — retrying…");
      setTimeout(() => {
        if (state.controller === controller) runSearch(search, { push: false, retries: retries + 1 });
      }, 1000);
      return;
    }
    if (!response.ok || !body || !Array.isArray(body.results)) {
      setBusy(false, "");
      const prefix = response.status >= 500 ? `Server error (${response.status}): ` : "";
      showError(prefix + (body ? detailOf(body, response) : `${response.status} ${response.statusText}`));
      // the results on screen would belong to another query
      state.results = [];
      el.results.replaceChildren();
      el.timings.hidden = true;
      return;
    }
    state.controller = null;
    hideLogin();
    render(search, body);
  }

  function render(search, body) {
    const results = body.results;
    state.results = results;
    setBusy(false, results.length
      ? `${results.length} result${results.length === 1 ? "" : "s"}` +
        (search.kind === "text" ? ` for “${body.query ?? search.q}”` : " for the query image")
      : (search.kind === "text" ? `No images found for “${body.query ?? search.q}”.` : "No images found for the query image.") +
        " The index may be empty.");

    const items = results.map((hit, index) => {
      const teacher = hit.teacher_score;
      const label = `Result ${hit.rank}: ${hit.path}`;
      // the link's text names the result; the thumbnail itself needs no second name
      const img = make("img", {
        src: hit.thumb_url, alt: "", decoding: "async",
        loading: index < 24 ? "eager" : "lazy",
      });
      img.addEventListener("error", () => img.closest(".tile")?.classList.add("broken"), { once: true });

      const scores = make("dl", { class: "scores" }, [
        make("div", { class: teacher == null ? "score off" : "score" }, [
          make("dt", { text: "teacher" }), make("dd", { text: fmtScore(teacher) }),
        ]),
        make("div", { class: "score" }, [
          make("dt", { text: "student" }), make("dd", { text: fmtScore(hit.student_score) }),
        ]),
      ]);
      const link = make("a", {
        class: "tile", href: hit.image_url, title: hit.path, "data-index": String(index),
      }, [
        make("span", { class: "thumb" }, [img, make("span", { class: "rank", text: `#${hit.rank}`, "aria-hidden": "true" })]),
        make("span", { class: "caption" }, [make("span", { class: "visually-hidden", text: label }),
          make("span", { class: "name", text: hit.path, "aria-hidden": "true" })]),
      ]);
      link.addEventListener("click", (event) => {
        if (event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
        event.preventDefault();
        openViewer(index, link);
      });
      return make("li", {}, [link, scores]);
    });
    el.results.replaceChildren(...items);
    el.empty.hidden = true;
    renderTimings(body);
  }

  function renderTimings(body) {
    const t = body.timings || {};
    const parts = [
      ["student encode", t.student_encode_ms], ["ANN", t.ann_ms],
      ["teacher encode", t.teacher_encode_ms], ["rerank", t.rerank_ms],
    ].filter(([, value]) => typeof value === "number");
    if (typeof t.queue_ms === "number" && t.queue_ms >= 0.05) parts.push(["queued", t.queue_ms]);
    el.timings.replaceChildren(
      make("span", { class: "label", text: "Timings" }),
      ...parts.map(([name, value]) => make("span", { class: "stage" }, [`${name} `, make("b", { text: fmtMs(value) })])),
      make("span", { class: "stage total" }, ["total ", make("b", { text: fmtMs(t.total_ms) })]),
      make("span", { class: "stage" }, [
        body.mode && body.mode !== "two-stage" ? `${body.mode}, ${body.candidates} candidates`
          : body.reranked ? `reranked by ${body.reranked} from ${body.candidates} candidates`
          : `no rerank, ${body.candidates} candidates`,
      ]),
    );
    el.timings.hidden = false;
  }

  // -- the query image ------------------------------------------------------------------

  function showQueryImage(file) {
    if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
    state.previewUrl = URL.createObjectURL(file);
    el.queryPreview.src = state.previewUrl;
    el.queryPreview.alt = `Query image ${file.name || ""}`.trim();
    el.queryName.textContent = file.name || "pasted image";
    el.queryImage.hidden = false;
    el.q.value = "";
  }

  function clearQueryImage() {
    el.queryImage.hidden = true;
    el.queryPreview.removeAttribute("src");
    if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
    state.previewUrl = null;
  }

  function searchImage(file) {
    if (!file) return;
    if (file.type && !file.type.startsWith("image/")) {
      showError(`${file.name || "That file"} is not an image (${file.type}); drop a JPEG, PNG, WebP or GIF.`);
      return;
    }
    const key = `img-${++imageCounter}`;
    imageQueries.set(key, file);
    runSearch({ kind: "image", file, key });
  }

  function firstImage(items) {
    for (const file of items || []) if (!file.type || file.type.startsWith("image/")) return file;
    return items && items.length ? items[0] : null;
  }

  // -- login ----------------------------------------------------------------------------

  function showLogin() {
    el.login.hidden = false;
    el.loginError.hidden = true;
    el.empty.hidden = true;
    el.statusText.textContent = "";
    el.apiKey.focus();
  }

  function hideLogin() {
    el.login.hidden = true;
    el.apiKey.value = "";
  }

  el.loginForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    el.loginError.hidden = true;
    const button = el.loginForm.querySelector("button");
    button.disabled = true;
    try {
      const response = await fetch("login", {
        method: "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify({ api_key: el.apiKey.value }),
      });
      if (!response.ok) {
        const body = await readJson(response);
        el.loginError.textContent = response.status === 401 ? "Wrong API key." : detailOf(body, response);
        el.loginError.hidden = false;
        el.apiKey.select();
        return;
      }
      hideLogin();
      const pending = state.pending || state.current;
      state.pending = null;
      if (pending) runSearch(pending, { push: false });
      else { el.empty.hidden = false; el.statusText.textContent = "Logged in."; el.q.focus(); }
    } catch {
      el.loginError.textContent = "Cannot reach the server.";
      el.loginError.hidden = false;
    } finally {
      button.disabled = false;
    }
  });

  // -- viewer (lightbox) ----------------------------------------------------------------

  function openViewer(index, opener) {
    state.opener = opener || document.activeElement;
    showInViewer(index);
    if (!el.viewer.open) el.viewer.showModal();
    el.viewerClose.focus();
  }

  function showInViewer(index) {
    const results = state.results;
    if (!results.length) return;
    index = (index + results.length) % results.length;
    state.viewing = index;
    const hit = results[index];
    el.viewerTitle.textContent = `#${hit.rank} ${hit.path}`;
    el.viewerImg.classList.add("loading");
    el.viewerImg.onload = () => el.viewerImg.classList.remove("loading");
    el.viewerImg.onerror = () => el.viewerImg.classList.remove("loading");
    el.viewerImg.src = hit.image_url;
    el.viewerImg.alt = hit.path;
    const meta = [
      `teacher ${fmtScore(hit.teacher_score)}`, `student ${fmtScore(hit.student_score)}`,
      hit.width && hit.height ? `${hit.width}×${hit.height}` : null, `${index + 1} of ${results.length}`,
    ].filter(Boolean);
    el.viewerMeta.replaceChildren(
      meta.join(" · "), " · ",
      make("a", { href: hit.image_url, target: "_blank", rel: "noopener", text: "open original" }),
    );
    el.viewerPrev.disabled = el.viewerNext.disabled = results.length < 2;
  }

  el.viewerPrev.addEventListener("click", () => showInViewer(state.viewing - 1));
  el.viewerNext.addEventListener("click", () => showInViewer(state.viewing + 1));
  el.viewerClose.addEventListener("click", () => el.viewer.close());
  el.viewer.addEventListener("keydown", (event) => {
    if (event.key === "ArrowLeft") { event.preventDefault(); showInViewer(state.viewing - 1); }
    else if (event.key === "ArrowRight") { event.preventDefault(); showInViewer(state.viewing + 1); }
    else if (event.key === "Home") { event.preventDefault(); showInViewer(0); }
    else if (event.key === "End") { event.preventDefault(); showInViewer(state.results.length - 1); }
  });
  // a click on the backdrop (outside the dialog's box) closes it
  el.viewer.addEventListener("click", (event) => {
    if (event.target !== el.viewer) return;
    const box = el.viewer.getBoundingClientRect();
    const inside = event.clientX >= box.left && event.clientX <= box.right &&
      event.clientY >= box.top && event.clientY <= box.bottom;
    if (!inside) el.viewer.close();
  });
  el.viewer.addEventListener("close", () => {
    el.viewerImg.removeAttribute("src");
    // focus the tile of the image last shown, so arrowing through the viewer moves the grid focus too
    const tile = el.results.querySelector(`.tile[data-index="${state.viewing}"]`);
    (tile || state.opener || el.q).focus();
    state.viewing = -1;
  });

  // -- events ---------------------------------------------------------------------------

  el.form.addEventListener("submit", (event) => {
    event.preventDefault();
    const q = el.q.value.trim();
    if (!q) {
      if (state.current && state.current.kind === "image") { runSearch(state.current, { push: false }); return; }
      showError("Type something to search for, or drop an image.");
      el.q.focus();
      return;
    }
    runSearch({ kind: "text", q });
  });

  const bareUrl = () => {
    const params = paramsFor(null).toString();
    return location.pathname + (params ? "?" + params : "");
  };
  const rerun = () => {
    if (!state.current) { history.replaceState(history.state, "", bareUrl()); return; }
    remember(state.current, true);
    runSearch(state.current, { push: false });
  };
  el.k.addEventListener("change", rerun);
  el.rerank.addEventListener("change", rerun);
  if (el.mode) el.mode.addEventListener("change", rerun);

  el.pick.addEventListener("click", () => el.file.click());
  el.file.addEventListener("change", () => {
    const file = el.file.files && el.file.files[0];
    el.file.value = "";
    searchImage(file);
  });
  el.clearImage.addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    history.pushState({}, "", bareUrl());
    reset();
    el.q.focus();
  });
  $("home").addEventListener("click", (event) => {
    event.preventDefault();
    history.pushState({}, "", location.pathname);
    controlsFromUrl();
    reset();
    el.q.focus();
  });

  // "/" focuses the search box (unless typing somewhere already)
  document.addEventListener("keydown", (event) => {
    if (event.key !== "/" || event.ctrlKey || event.metaKey || event.altKey) return;
    const target = event.target;
    const typing = target instanceof HTMLElement &&
      (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName));
    if (typing || el.viewer.open) return;
    event.preventDefault();
    el.q.focus();
    el.q.select();
  });

  // drop an image anywhere on the page
  let dragDepth = 0;
  const hasFiles = (event) => event.dataTransfer && [...(event.dataTransfer.types || [])].includes("Files");
  document.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    dragDepth += 1;
    el.dropzone.hidden = false;
  });
  document.addEventListener("dragover", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = "copy";
  });
  document.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (!dragDepth) el.dropzone.hidden = true;
  });
  document.addEventListener("drop", (event) => {
    dragDepth = 0;
    el.dropzone.hidden = true;
    const files = event.dataTransfer && event.dataTransfer.files;
    if (!files || !files.length) return;
    event.preventDefault();
    if (el.viewer.open) el.viewer.close();
    searchImage(firstImage(files));
  });
  // paste an image (e.g. a screenshot) to search with it
  document.addEventListener("paste", (event) => {
    const files = event.clipboardData && event.clipboardData.files;
    const file = files && firstImage(files);
    if (!file || !(file.type || "").startsWith("image/")) return;
    event.preventDefault();
    searchImage(file);
  });

  window.addEventListener("popstate", restore);

  // -- server state ---------------------------------------------------------------------

  // /health needs no API key: it says whether the models are loaded, and how many images there are.
  async function checkHealth() {
    let body = null;
    try {
      body = await readJson(await fetch("health", { headers: { Accept: "application/json" } }));
    } catch { return; /* a search reports an unreachable server itself */ }
    if (!body) return;
    const rows = typeof body.live_rows === "number" ? body.live_rows : null;
    if (rows !== null) el.corpus.textContent = `${rows.toLocaleString()} image${rows === 1 ? "" : "s"} indexed.`;
    if (body.status === "loading") {
      if (!state.current) el.statusText.textContent = "The server is loading its models…";
      setTimeout(checkHealth, 1000);
    } else if (body.status === "failed") {
      showError("The server could not load its models" + (typeof body.detail === "string" ? `: ${body.detail}` : "."));
    } else if (body.status === "ready" && !state.current && el.statusText.textContent.startsWith("The server")) {
      el.statusText.textContent = "";
    }
  }

  // -- start ----------------------------------------------------------------------------

  history.replaceState(history.state || {}, "", location.href);
  restore();
  checkHealth();
})();
