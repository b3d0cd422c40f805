// tokensteer playground: streams /v1/completions, shades each token by its probability, shows
// its top alternatives (and, with trace on, each formula term's log-probability) on hover, and
// runs the same prompt and seed without the controls beside it. No framework, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, runs: [] };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("apikey").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function errorText(obj, status) {
  const e = obj && obj.error;
  if (!e) return "HTTP " + status;
  return e.message + (e.param ? "  (" + e.param + ")" : "");
}

async function loadOptions() {
  const key = localStorage.getItem("tokensteer.apikey");
  if (key && !$("apikey").value) $("apikey").value = key;
  const r = await fetch("/v1/tokensteer/options", { headers: headers() });
  const obj = await r.json().catch(() => null);
  if (!r.ok) {
    $("status").textContent = errorText(obj, r.status);
    return;
  }
  state.model = obj.model;
  $("model").textContent = obj.model + " on " + obj.backend;
  const recipe = $("recipe");
  recipe.length = 1;
  for (const r of obj.recipes) recipe.add(new Option(r.usage, r.name));
  state.recipes = Object.fromEntries(obj.recipes.map((r) => [r.name, r]));
  const vec = $("vector");
  vec.length = 1;
  for (const v of obj.vectors) vec.add(new Option(v, v));
  $("status").textContent = "";
}

function num(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

function controls() {
  const ts = {};
  const formula = $("formula").value.trim();
  if (formula) ts.formula = formula;
  if ($("trace").checked) ts.trace = true;
  if ($("vector").value) {
    const s = { vector: $("vector").value };
    if (num("strength") !== null) s.strength = num("strength");
    if ($("layers").value.trim()) s.layers = $("layers").value.trim();
    ts.steer = [s];
  }
  const c = {};
  const ban = $("ban").value.split(",").map((w) => w.trim()).filter(Boolean);
  if (ban.length) c.ban = ban;
  if (num("words") !== null) c.words = num("words");
  if ($("end_word").value.trim()) c.end_word = $("end_word").value.trim();
  if ($("regex").value) c.regex = $("regex").value;
  if ($("script").value.trim()) c.script = $("script").value.trim();
  const schema = $("json_schema").value.trim();
  if (schema) {
    try { c.json_schema = JSON.parse(schema); }
    catch (e) { throw new Error("the JSON schema is not valid JSON: " + e.message); }
  }
  if (Object.keys(c).length) ts.constraints = c;
  return ts;
}

function request(withControls) {
  const body = {
    model: state.model,
    prompt: $("prompt").value,
    max_tokens: num("max_tokens") ?? 40,
    temperature: num("temperature") ?? 1,
    top_p: num("top_p") ?? 1,
    seed: num("seed") ?? 0,
    logprobs: 5,
    stream: true,
  };
  if (num("top_k")) body.top_k = num("top_k");
  if (withControls) {
    const ts = controls();
    if (Object.keys(ts).length) body.tokensteer = ts;
  }
  return body;
}

function column(title) {
  const col = document.createElement("div");
  col.className = "column";
  col.innerHTML = "<h3></h3><div class='text'><span class='prompt'></span></div><div class='meta'></div>";
  col.querySelector("h3").textContent = title;
  col.querySelector(".prompt").textContent = $("prompt").value;
  $("out").appendChild(col);
  return col;
}

function showError(col, message) {
  const box = document.createElement("div");
  box.className = "error";
  box.textContent = message;
  col.appendChild(box);
}

function shade(p) {
  // likely tokens stay pale, unlikely ones get a strong warm background
  const a = Math.min(0.85, 0.08 + 0.77 * (1 - p));
  return "rgba(255, 120, 40, " + a.toFixed(3) + ")";
}

function addToken(col, choice) {
  const lp = choice.logprobs;
  const span = document.createElement("span");
  span.className = "tok";
  span.textContent = choice.text;
  if (lp && lp.tokens && lp.tokens.length) {
    const p = Math.exp(lp.token_logprobs[0]);
    span.dataset.p = p.toFixed(4);
    span.style.background = shade(p);
    span.info = { token: lp.tokens[0], logprob: lp.token_logprobs[0], top: (lp.top_logprobs || [])[0] || {}, trace: choice.tokensteer && choice.tokensteer.trace };
  }
  col.querySelector(".text").appendChild(span);
}

async function stream(col, body, signal) {
  const t0 = performance.now();
  let n = 0, first = null, reason = null;
  let r;
  try {
    r = await fetch("/v1/completions", { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  } catch (e) {
    if (e.name !== "AbortError") showError(col, "request failed: " + e.message);
    return;
  }
  if (!r.ok) {
    showError(col, errorText(await r.json().catch(() => null), r.status));
    return;
  }
  const reader = r.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const frame = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        const data = frame.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
        if (!data || data === "[DONE]") continue;
        const obj = JSON.parse(data);
        if (obj.error) { showError(col, errorText(obj, 200)); continue; }
        for (const ch of obj.choices) {
          if (first === null) first = performance.now() - t0;
          if (ch.logprobs) n += 1;
          addToken(col, ch);
          if (ch.finish_reason) reason = ch.finish_reason;
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") showError(col, "stream broke: " + e.message);
  }
  const secs = (performance.now() - t0) / 1000;
  col.querySelector(".meta").textContent = n + " tokens" + (reason ? ", " + reason : "") +
    (first !== null ? ", first token after " + Math.round(first) + " ms" : "") + ", " + secs.toFixed(1) + " s";
}

async function run(ev) {
  ev.preventDefault();
  localStorage.setItem("tokensteer.apikey", $("apikey").value);
  if (!state.model) await loadOptions();
  const out = $("out");
  out.innerHTML = "";
  const side = $("side").checked;
  out.className = side ? "two" : "";
  const jobs = [];
  const ctl = new AbortController();
  state.abort = ctl;
  const main = column(side ? "with the controls" : "output");
  try {
    jobs.push(stream(main, request(true), ctl.signal));
  } catch (e) {
    showError(main, e.message);
  }
  if (side) jobs.push(stream(column("without the controls"), request(false), ctl.signal));
  $("run").disabled = true;
  $("stop").disabled = false;
  $("status").textContent = "running…";
  await Promise.all(jobs);
  $("run").disabled = false;
  $("stop").disabled = true;
  $("status").textContent = "";
}

function fmt(x) {
  return x === null || x === undefined ? "−∞" : x.toFixed(3);
}

function showTip(span, x, y) {
  const info = span.info;
  if (!info) return;
  const tip = $("tip");
  const rows = Object.entries(info.top).sort((a, b) => b[1] - a[1]);
  let html = "<table>";
  for (const [tok, lp] of rows) {
    const cls = tok === info.token ? " class='chosen'" : "";
    html += "<tr" + cls + "><td>" + esc(JSON.stringify(tok)) + "</td><td class='num'>" + (100 * Math.exp(lp)).toFixed(1) + " %</td><td class='num'>" + fmt(lp) + "</td></tr>";
  }
  html += "</table>";
  if (info.trace) {
    html += "<h4>formula terms (log-probability of this token)</h4><table>";
    for (const t of info.trace.terms) html += "<tr><td title='" + esc(t.term) + "'>" + esc(shorten(t.term)) + " ×" + t.weight.toPrecision(3) + "</td><td class='num'>" + fmt(t.logprob) + "</td></tr>";
    html += "<tr><td>combined</td><td class='num'>" + fmt(info.trace.combined) + "</td></tr>";
    html += "<tr><td>base model</td><td class='num'>" + fmt(info.trace.base) + "</td></tr></table>";
  }
  tip.innerHTML = "<div><b>" + esc(JSON.stringify(info.token)) + "</b> p = " + (100 * Math.exp(info.logprob)).toFixed(1) + " %</div>" + html;
  tip.hidden = false;
  tip.style.left = Math.min(x + 12, window.innerWidth - tip.offsetWidth - 8) + "px";
  tip.style.top = (y + 16) + "px";
}

function shorten(term) {
  // long conditioning texts: keep the start of each quoted string
  return term.replace(/"((?:[^"\\]|\\.){28})(?:[^"\\]|\\.)+"/g, (m, head) => '"' + head + '…"');
}

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

document.addEventListener("mouseover", (e) => {
  if (e.target.classList && e.target.classList.contains("tok")) showTip(e.target, e.clientX, e.clientY);
});
document.addEventListener("mouseout", (e) => {
  if (e.target.classList && e.target.classList.contains("tok")) $("tip").hidden = true;
});
$("form").addEventListener("submit", run);
$("stop").addEventListener("click", () => state.abort && state.abort.abort());
$("recipe").addEventListener("change", () => {
  const r = state.recipes && state.recipes[$("recipe").value];
  if (!r) return;
  $("formula").value = r.name;
  $("recipe_doc").textContent = r.doc + "  Expands to: " + r.formula;
});
$("apikey").addEventListener("change", () => { localStorage.setItem("tokensteer.apikey", $("apikey").value); loadOptions(); });
loadOptions();
