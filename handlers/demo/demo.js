// Wardrobe reference client: SMS login, credits, features, upload, tasks, live events.
// Plain browser JavaScript, no build step; every call is the public API of /work/shared/API.md.
"use strict";

(() => {
  const API = "/api/v1";
  const STORE = "wardrobe.demo";
  const RANK = { queued: 0, running: 1, succeeded: 2, failed: 2, cancelled: 2 };
  const LOG_MAX = 300;

  const $ = (id) => document.getElementById(id);
  const state = {
    access: null,
    refresh: null,
    user: null,
    features: [],
    assets: {}, // input name -> asset id
    run: null, // {key, body}: an unanswered POST /tasks, retried with the same Idempotency-Key
    channels: [], // the payment channels GET /products offers
    taskId: null,
    tasks: {}, // task id -> {status, progress} as events told it (they may beat the POST's answer)
    ws: null,
    wsWanted: false,
    retries: 0,
    reconnectTimer: null,
    lastSeq: null, // highest event seq handled; resumes after it on reconnect
    resumedFrom: null,
    ackTimer: null,
  };

  class ApiError extends Error {
    constructor(status, error) {
      super(error ? `${error.code}: ${error.message}` : `HTTP ${status}`);
      this.status = status;
      this.code = error ? error.code : null;
      this.retryAfter = null;
    }
  }

  // ------------------------------------------------------------------ storage

  function save() {
    const kept = { access: state.access, refresh: state.refresh, lastSeq: state.lastSeq };
    sessionStorage.setItem(STORE, JSON.stringify(kept));
  }

  function load() {
    try {
      const kept = JSON.parse(sessionStorage.getItem(STORE) || "{}");
      state.access = kept.access || null;
      state.refresh = kept.refresh || null;
      state.lastSeq = Number.isInteger(kept.lastSeq) ? kept.lastSeq : null;
    } catch (e) {
      sessionStorage.removeItem(STORE);
    }
  }

  // ------------------------------------------------------------------ HTTP

  async function api(method, path, opts = {}) {
    const { json, form, headers = {}, auth = true, retry = true } = opts;
    const h = { Accept: "application/json", ...headers };
    let body;
    if (json !== undefined) {
      h["Content-Type"] = "application/json";
      body = JSON.stringify(json);
    } else if (form !== undefined) {
      body = form; // the browser writes the multipart boundary
    }
    if (auth && state.access) h.Authorization = `Bearer ${state.access}`;
    const resp = await fetch(API + path, { method, headers: h, body });
    const text = await resp.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (e) {
      data = null;
    }
    if (resp.status === 401 && auth && retry && data && data.error && data.error.code === "TOKEN_EXPIRED") {
      if (await refreshTokens()) return api(method, path, { ...opts, retry: false });
    }
    if (!resp.ok) {
      const err = new ApiError(resp.status, data && data.error);
      err.retryAfter = Number(resp.headers.get("Retry-After")) || null;
      throw err;
    }
    return { status: resp.status, data };
  }

  let refreshing = null;
  function refreshTokens() {
    // One refresh at a time: a refresh token works once, a second use would end the session.
    if (!refreshing) {
      refreshing = (async () => {
        if (!state.refresh) return false;
        try {
          const { data } = await api("POST", "/auth/refresh", {
            json: { refresh_token: state.refresh },
            auth: false,
          });
          state.access = data.access_token;
          state.refresh = data.refresh_token;
          save();
          log("ctl", "tokens refreshed");
          return true;
        } catch (e) {
          log("err", `refresh failed: ${e.message}`);
          signedOut("Session ended, log in again.");
          return false;
        }
      })().finally(() => {
        refreshing = null;
      });
    }
    return refreshing;
  }

  function uuid() {
    if (window.crypto && typeof crypto.randomUUID === "function") return crypto.randomUUID();
    // crypto.randomUUID needs a secure context (https or localhost); plain http on a LAN
    // address still has getRandomValues.
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }

  // ------------------------------------------------------------------ log

  function log(kind, text, seq, event) {
    const list = $("events");
    const li = document.createElement("li");
    li.className = kind;
    if (seq !== undefined) {
      li.dataset.seq = String(seq);
      li.dataset.event = event;
    }
    const time = new Date().toLocaleTimeString([], { hour12: false });
    li.textContent = `${time}  ${seq === undefined ? "·" : ""} ${text}`;
    const atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 4;
    list.append(li);
    while (list.children.length > LOG_MAX) list.firstElementChild.remove();
    if (atBottom) list.scrollTop = list.scrollHeight;
  }

  function showError(message) {
    $("error").textContent = message || "";
  }

  // ------------------------------------------------------------------ login

  function phone() {
    return $("phone").value.trim();
  }

  async function sendCode() {
    const p = phone();
    if (!p) {
      $("auth-status").textContent = "Enter a phone number.";
      return;
    }
    $("send-code").disabled = true;
    let wait = 60;
    try {
      const { data } = await api("POST", "/auth/sms-codes", { json: { phone: p, purpose: "login" }, auth: false });
      wait = data.retry_after || wait;
      $("auth-status").textContent = "Code sent.";
    } catch (e) {
      $("auth-status").textContent = e.message;
      wait = e.retryAfter || (e.code === "RATE_LIMITED" ? wait : 0);
    }
    cooldown(wait);
    await devShortcut(p);
  }

  async function devShortcut(p) {
    // Dev shortcut: this endpoint exists only when APP_ENV is dev or test.
    try {
      const { data } = await api("GET", `/dev/sms/${encodeURIComponent(p)}`, { auth: false });
      if (data.purpose === "login") {
        $("sms-code").value = data.code;
        $("dev-shortcut").hidden = false;
      }
    } catch (e) {
      $("dev-shortcut").hidden = true;
    }
  }

  function cooldown(seconds) {
    const button = $("send-code");
    let left = Math.ceil(seconds);
    const tick = () => {
      if (left <= 0) {
        button.disabled = false;
        button.textContent = "Send code";
        return;
      }
      button.disabled = true;
      button.textContent = `Resend in ${left}s`;
      left -= 1;
      setTimeout(tick, 1000);
    };
    tick();
  }

  async function login() {
    const code = $("sms-code").value.trim();
    if (!phone() || !code) {
      $("auth-status").textContent = "Enter the phone and the SMS code.";
      return;
    }
    $("login").disabled = true;
    try {
      const { data } = await api("POST", "/auth/login", { json: { phone: phone(), sms_code: code }, auth: false });
      state.access = data.access_token;
      state.refresh = data.refresh_token;
      state.lastSeq = null; // a new login may be another user: start at their current seq
      save();
      signedIn(data.user);
    } catch (e) {
      $("auth-status").textContent = e.message;
    } finally {
      $("login").disabled = false;
    }
  }

  async function logout() {
    const token = state.refresh;
    signedOut("Logged out.");
    if (token) {
      try {
        await api("POST", "/auth/logout", { json: { refresh_token: token }, auth: false });
      } catch (e) {
        log("err", `logout: ${e.message}`);
      }
    }
  }

  async function signedIn(user) {
    if (!user) {
      try {
        user = (await api("GET", "/me")).data;
      } catch (e) {
        signedOut(e.code === "FORBIDDEN" ? e.message : "Log in.");
        return;
      }
    }
    state.user = user;
    $("auth-status").textContent = `Logged in as ${user.phone} (user ${user.id}).`;
    $("logout").hidden = false;
    $("login-box").classList.add("done");
    setFormEnabled(true);
    await loadQuota();
    state.wsWanted = true;
    connect();
  }

  function signedOut(message) {
    state.access = state.refresh = state.user = null;
    state.lastSeq = null;
    sessionStorage.removeItem(STORE);
    state.wsWanted = false;
    clearTimeout(state.reconnectTimer);
    if (state.ws) state.ws.close(1000, "logout");
    $("auth-status").textContent = message;
    $("logout").hidden = true;
    $("credits").textContent = $("balance").textContent = $("reserved").textContent = "–";
    setFormEnabled(false);
  }

  // ------------------------------------------------------------------ credits

  function showQuota(q) {
    $("credits").textContent = String(q.available);
    $("balance").textContent = String(q.balance);
    $("reserved").textContent = String(q.reserved);
  }

  async function loadQuota() {
    try {
      showQuota((await api("GET", "/me/quota")).data);
    } catch (e) {
      showError(e.message);
    }
  }

  // ------------------------------------------------------------------ buying credits (dev)

  async function loadProducts() {
    try {
      const { data } = await api("GET", "/products", { auth: false });
      state.channels = data.channels;
      const packs = data.items.filter((p) => p.kind === "credits");
      $("pack").replaceChildren(
        ...packs.map((p) => {
          const o = document.createElement("option");
          o.value = p.id;
          o.textContent = `${p.name} — ¥${(p.price_fen / 100).toFixed(2)}`;
          return o;
        }),
      );
      if (!state.channels.length) $("buy-info").textContent = "No payment channel is configured on this server.";
    } catch (e) {
      showError(`products: ${e.message}`);
    }
  }

  async function buy() {
    $("buy").disabled = true;
    try {
      const order = (
        await api("POST", "/orders", {
          json: { product_id: $("pack").value, channel: state.channels[0] },
          headers: { "Idempotency-Key": uuid() },
        })
      ).data;
      const paid = (await api("POST", `/dev/orders/${order.order_no}/paid`, { auth: false })).data;
      $("buy-info").textContent = `Order ${paid.order_no}: ${paid.status}.`;
      await loadQuota(); // quota.changed also arrives on the socket
    } catch (e) {
      showError(`buy: ${e.message}`);
    } finally {
      $("buy").disabled = !(state.access && state.channels && state.channels.length);
    }
  }

  // ------------------------------------------------------------------ features and inputs

  async function loadFeatures() {
    const select = $("feature");
    try {
      state.features = (await api("GET", "/features", { auth: false })).data;
    } catch (e) {
      showError(`features: ${e.message}`);
      return;
    }
    select.replaceChildren(
      ...state.features.map((f) => {
        const o = document.createElement("option");
        o.value = f.slug;
        o.textContent = `${f.name} (${f.slug}) — ${f.cost} credits`;
        return o;
      }),
    );
    renderInputs();
  }

  function feature() {
    return state.features.find((f) => f.slug === $("feature").value) || null;
  }

  // One field per input of the feature; the first image input is #file.
  function renderInputs() {
    const f = feature();
    const box = $("inputs");
    box.replaceChildren();
    state.assets = {};
    state.run = null;
    $("feature-info").textContent = f ? f.description : "";
    if (!f) return;
    let firstImage = true;
    for (const [name, spec] of Object.entries(f.inputs)) {
      const label = document.createElement("label");
      let field;
      if (spec.type === "image") {
        field = document.createElement("input");
        field.type = "file";
        field.accept = "image/jpeg,image/png,image/webp";
        field.id = firstImage ? "file" : `file-${name}`;
        firstImage = false;
        field.addEventListener("change", () => upload(name, field));
      } else if (spec.type === "choice") {
        field = document.createElement("select");
        for (const c of spec.choices || []) field.append(new Option(c, c));
        field.id = `input-${name}`;
      } else {
        field = document.createElement("input");
        field.maxLength = spec.max_length || 500;
        field.id = `input-${name}`;
      }
      field.dataset.input = name;
      field.dataset.type = spec.type;
      field.disabled = !state.access;
      label.htmlFor = field.id;
      label.textContent = `${name} (${spec.type}${spec.required ? ", required" : ""})`;
      const info = document.createElement("div");
      info.className = "asset muted";
      info.id = `asset-${name}`;
      box.append(label, field, info);
    }
  }

  function setFormEnabled(on) {
    for (const el of document.querySelectorAll("#inputs [data-input]")) el.disabled = !on;
    $("run").disabled = !on;
    $("ws-toggle").disabled = !on;
    const canBuy = on && Boolean(state.channels && state.channels.length);
    $("pack").disabled = $("buy").disabled = !canBuy;
  }

  async function upload(name, field) {
    const file = field.files[0];
    const info = $(`asset-${name}`);
    delete state.assets[name];
    state.run = null;
    info.replaceChildren();
    if (!file) return;
    info.textContent = `uploading ${file.name}…`;
    const form = new FormData();
    form.append("file", file);
    try {
      const { data } = await api("POST", "/assets", { form });
      state.assets[name] = data.id;
      const img = document.createElement("img");
      img.src = data.url;
      img.alt = name;
      img.className = "thumb";
      info.replaceChildren(img, ` asset ${data.id} · ${data.width}×${data.height} · ${data.bytes} bytes`);
      info.dataset.assetId = data.id;
    } catch (e) {
      info.textContent = e.message;
    }
  }

  // ------------------------------------------------------------------ tasks

  function taskBody() {
    const f = feature();
    if (!f) throw new Error("Pick a feature.");
    const inputs = {};
    for (const el of document.querySelectorAll("#inputs [data-input]")) {
      const name = el.dataset.input;
      const value = el.dataset.type === "image" ? state.assets[name] : el.value;
      if (value) inputs[name] = value;
      else if (f.inputs[name].required) {
        throw new Error(el.dataset.type === "image" ? `Upload an image for “${name}” first.` : `Fill in “${name}”.`);
      }
    }
    return { feature: f.slug, inputs };
  }

  async function runTask() {
    showError("");
    let body;
    try {
      body = taskBody();
    } catch (e) {
      showError(e.message);
      return;
    }
    // The same click after a lost answer reuses its key: the server answers with that task
    // instead of charging twice. New inputs, new key.
    const text = JSON.stringify(body);
    if (!state.run || state.run.body !== text) state.run = { key: uuid(), body: text };
    $("run").disabled = true;
    try {
      const { data } = await api("POST", "/tasks", { json: body, headers: { "Idempotency-Key": state.run.key } });
      state.run = null;
      startTask(data);
    } catch (e) {
      if (e instanceof ApiError) state.run = null; // answered: a retry is a new request
      showError(e.message);
    } finally {
      $("run").disabled = false;
    }
  }

  function startTask(task) {
    state.taskId = task.id;
    $("task-id").textContent = task.id;
    $("result").hidden = true;
    $("result").querySelector("img").removeAttribute("src");
    $("progress").value = 0;
    $("status").textContent = "";
    // Events may have come before this answer: setTask keeps the furthest state.
    setTask(task.id, { status: task.status, progress: task.progress }, true);
  }

  // Apply what is known of a task; statuses never move backwards.
  function setTask(id, { status, progress }, shown = false) {
    const t = state.tasks[id] || (state.tasks[id] = { status: null, progress: 0 });
    if (progress !== undefined && progress > t.progress) t.progress = progress;
    const moved = status && (t.status === null || RANK[status] > RANK[t.status]);
    if (moved) t.status = status;
    if (status === "succeeded") t.progress = 1;
    if (id !== state.taskId) return;
    $("progress").value = t.progress;
    $("status").textContent = t.status || "";
    if ((moved || shown) && RANK[t.status] === 2) finished(id);
  }

  // After a reset the missed events are gone: read the task itself.
  async function refetchTask(id) {
    try {
      const { data: task } = await api("GET", `/tasks/${encodeURIComponent(id)}`);
      setTask(id, { status: task.status, progress: task.progress }, true);
    } catch (e) {
      showError(e.message);
    }
  }

  async function finished(id) {
    try {
      const { data: task } = await api("GET", `/tasks/${encodeURIComponent(id)}`);
      if (id !== state.taskId) return;
      if (task.status === "succeeded" && task.outputs.length) {
        const fig = $("result");
        const img = fig.querySelector("img");
        img.src = task.outputs[0].url;
        fig.querySelector("figcaption").textContent =
          `${task.feature} · ${task.cost} credits · output asset ${task.outputs[0].asset_id}`;
        fig.hidden = false;
      } else if (task.error) {
        showError(`${task.error.code}: ${task.error.message}`);
      }
    } catch (e) {
      showError(e.message);
    }
  }

  // ------------------------------------------------------------------ WebSocket

  function setWsState(text) {
    $("ws-state").textContent = text;
    $("ws-toggle").textContent = state.wsWanted ? "Disconnect" : "Connect";
  }

  function connect() {
    clearTimeout(state.reconnectTimer);
    if (!state.access || (state.ws && state.ws.readyState <= WebSocket.OPEN)) return;
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${scheme}//${location.host}${API}/ws`);
    state.ws = ws;
    setWsState("connecting");
    ws.onopen = () => {
      send({ type: "auth", token: state.access });
      setWsState("authenticating");
    };
    ws.onmessage = (msg) => {
      let frame;
      try {
        frame = JSON.parse(msg.data);
      } catch (e) {
        log("err", `bad frame: ${msg.data}`);
        return;
      }
      onFrame(frame);
    };
    ws.onclose = (ev) => {
      if (state.ws !== ws) return;
      state.ws = null;
      log("ctl", `socket closed ${ev.code}${ev.reason ? ` ${ev.reason}` : ""}`);
      setWsState(`closed (${ev.code})`);
      if (!state.wsWanted) return;
      if (ev.code === 4401) {
        // Unauthenticated or expired: a fresh access token, then again.
        refreshTokens().then((ok) => ok && reconnectSoon(0));
      } else {
        reconnectSoon();
      }
    };
  }

  function reconnectSoon(delay) {
    if (delay === undefined) {
      delay = Math.min(15000, 500 * 2 ** state.retries) * (0.75 + Math.random() / 2);
      state.retries += 1;
    }
    log("ctl", `reconnecting in ${(delay / 1000).toFixed(1)} s`);
    state.reconnectTimer = setTimeout(connect, delay);
  }

  function send(frame) {
    if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(frame));
  }

  function resume(afterSeq) {
    state.resumedFrom = afterSeq;
    log("ctl", `→ resume after_seq=${afterSeq}`);
    send({ type: "resume", after_seq: afterSeq });
  }

  function onFrame(frame) {
    switch (frame.type) {
      case "ready":
        state.retries = 0;
        setWsState("open");
        log("ctl", `ready user ${frame.user_id}, server last_seq=${frame.last_seq}`);
        if (state.lastSeq === null || frame.last_seq < state.lastSeq) {
          // First connection (the page read the current state over HTTP), or the
          // server's history is not the one we knew: start from here.
          state.lastSeq = frame.last_seq;
          showSeq();
        } else if (frame.last_seq > state.lastSeq) {
          resume(state.lastSeq); // missed events while away: replay them
        }
        break;
      case "event":
        onEvent(frame);
        break;
      case "auth.expiring":
        log("ctl", `token expires at ${frame.expires_at}: refreshing`);
        refreshTokens().then((ok) => ok && send({ type: "auth", token: state.access }));
        break;
      case "auth.ok":
        log("ctl", `re-authenticated until ${frame.expires_at}`);
        break;
      case "error":
        log("err", `error ${frame.code}: ${frame.message}`);
        break;
      case "reset":
        // The server no longer keeps the events after our seq: take its position and
        // read the current state over REST instead of replaying.
        log("ctl", `reset (${frame.reason}): continuing after seq ${frame.last_seq}; refetching state`);
        state.lastSeq = frame.last_seq;
        state.resumedFrom = frame.last_seq;
        showSeq();
        loadQuota();
        if (state.taskId) refetchTask(state.taskId);
        break;
      case "pong":
        break;
      default:
        log("ctl", `frame ${JSON.stringify(frame)}`);
    }
  }

  function onEvent(frame) {
    const seq = frame.seq;
    if (state.lastSeq !== null && seq <= state.lastSeq) return; // already handled (replay overlap)
    if (state.lastSeq !== null && seq > state.lastSeq + 1 && state.resumedFrom !== state.lastSeq) {
      log("ctl", `gap: expected seq ${state.lastSeq + 1}, got ${seq}`);
      resume(state.lastSeq); // the replay brings this one too
      return;
    }
    state.lastSeq = seq;
    state.resumedFrom = null;
    save();
    showSeq();
    log("ev", `#${seq} ${frame.event} ${JSON.stringify(frame.data)}`, seq, frame.event);
    const d = frame.data || {};
    if (frame.event === "task.progress") setTask(d.task_id, { progress: d.progress });
    else if (frame.event === "task.updated") setTask(d.task_id, { status: d.status });
    else if (frame.event === "quota.changed") showQuota(d);
    clearTimeout(state.ackTimer);
    state.ackTimer = setTimeout(() => send({ type: "ack", seq: state.lastSeq }), 500);
  }

  function showSeq() {
    $("last-seq").textContent = state.lastSeq === null ? "–" : String(state.lastSeq);
  }

  function toggleSocket() {
    state.wsWanted = !state.wsWanted;
    if (state.wsWanted) {
      state.retries = 0;
      connect();
    } else {
      clearTimeout(state.reconnectTimer);
      if (state.ws) state.ws.close(1000, "closed by the user");
    }
    setWsState($("ws-state").textContent);
  }

  // ------------------------------------------------------------------ start

  document.addEventListener("DOMContentLoaded", async () => {
    $("send-code").addEventListener("click", sendCode);
    $("login").addEventListener("click", login);
    $("logout").addEventListener("click", logout);
    $("feature").addEventListener("change", renderInputs);
    $("run").addEventListener("click", runTask);
    $("ws-toggle").addEventListener("click", toggleSocket);
    $("buy").addEventListener("click", buy);
    load();
    showSeq();
    setFormEnabled(false);
    await loadProducts();
    await loadFeatures();
    $("feature").disabled = false;
    if (state.access) await signedIn(null);
    document.body.dataset.ready = "1";
  });
})();
