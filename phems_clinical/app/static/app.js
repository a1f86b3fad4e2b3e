// The dosing page: builds a dosing request (data_schemas/dosing_request.schema.json)
// from the form, posts it to /api/dose and shows the result or, for bad input, each
// error next to its field. Plain JavaScript, no libraries, nothing loaded from
// outside this server. The server validates; the page only shapes the request.
"use strict";

(() => {
  // The minimal example request: a child on Advate with three measured levels.
  const DEFAULT_REQUEST = {
    product: "advate",
    weight_kg: 25,
    age_y: 8,
    infusions: [{ time_h: 0, dose_IU: 1000, duration_h: 0.17 }],
    levels: [
      { time_h: 4, value: 40.2, unit: "IU/dL" },
      { time_h: 24, value: 10.1, unit: "IU/dL" },
      { time_h: 48, value: 1.5, unit: "IU/dL" },
    ],
  };

  // Top-level request fields that have an input on the page.
  const NUMBER_FIELDS = ["weight_kg", "age_y", "height_cm", "vwf_IU_dL"];
  const TEXT_FIELDS = ["patient_id"];
  const CHOICE_FIELDS = ["blood_group", "assay"];
  const FORM_FIELDS = new Set(["product", ...NUMBER_FIELDS, ...TEXT_FIELDS,
    ...CHOICE_FIELDS, "infusions", "levels"]);
  const INFUSION_KEYS = new Set(["time_h", "datetime", "dose_IU", "duration_h"]);
  const LEVEL_KEYS = new Set(["time_h", "datetime", "value", "unit", "blq", "lloq"]);
  const UNITS = ["IU/dL", "IU/mL", "%"];
  const DATETIME = /^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}/;

  const $ = (sel, root = document) => root.querySelector(sel);
  const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
  const form = $("#dose-form");
  let products = [];
  let extras = {};          // request fields from a loaded file that the form lacks
  let jsonUrl = null;       // blob: URL of the current result.json
  let idCounter = 0;

  // ---------- small helpers ----------

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "text") node.textContent = v;
      else if (k === "className") node.className = v;
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children) node.append(c);
    return node;
  }

  // A number typed by a person: "" -> undefined (field omitted), "40,2" -> 40.2,
  // anything that is not a number is sent as typed so that the server can say why.
  function parseNumber(text) {
    const s = text.trim();
    if (s === "") return undefined;
    const t = /^[-+]?\d+,\d+$/.test(s) ? s.replace(",", ".") : s;
    const n = Number(t);
    return Number.isFinite(n) ? n : s;
  }

  // Infinite numbers arrive as the strings "inf" / "-inf" (JSON has no infinity):
  // for a time to a threshold they mean the level never gets there.
  function fmt(x, inf = "∞") {
    if (x === "inf") x = Infinity;
    else if (x === "-inf") x = -Infinity;
    if (x === Infinity) return inf;
    if (x === -Infinity) return `-${inf}`;
    if (x === null || x === undefined || !Number.isFinite(x)) return "–";
    const a = Math.abs(x);
    if (Number.isInteger(x) && a < 1e7) return String(x);
    if (a >= 100) return x.toFixed(0);
    if (a >= 10) return x.toFixed(1);
    if (a >= 1) return x.toFixed(2);
    if (a === 0) return "0";
    return x.toPrecision(2);
  }

  function fmtInterval(est, inf = "∞") {
    if (!est) return "–";
    return `${fmt(est.lo90, inf)} – ${fmt(est.hi90, inf)}`;
  }

  // 3 significant figures without trailing zeros, for ranges in running text.
  function plain(x) {
    return Number.isFinite(x) ? String(Number(x.toPrecision(3))) : "–";
  }

  function fmtPercent(p) {
    if (p === null || p === undefined || !Number.isFinite(p)) return "–";
    // From a finite set of draws, "100%" would overstate the certainty.
    if (p > 0.99) return "> 99%";
    if (p > 0 && p < 0.01) return "< 1%";
    return `${Math.round(100 * p)}%`;
  }

  // "levels[1].value" -> "Level 2, value" (for messages not shown next to an input).
  const FIELD_NAMES = { infusions: "Infusions", levels: "Measured levels",
    model: "Model file", options: "Options", baseline: "Baseline level",
    method: "Method", "Content-Type": "Request format" };

  function fieldLabel(field) {
    if (!field) return "Request";
    const input = findInput(field);
    if (input) return input.getAttribute("aria-label") || labelText(input) || field;
    if (FIELD_NAMES[field]) return FIELD_NAMES[field];
    return field
      .replace(/^infusions\[(\d+)\]/, (_, i) => `Infusion ${Number(i) + 1}`)
      .replace(/^levels\[(\d+)\]/, (_, i) => `Level ${Number(i) + 1}`)
      .replace(/\./g, ", ");
  }

  function labelText(input) {
    const label = input.id ? $(`label[for="${input.id}"]`) : null;
    if (!label) return "";
    const clone = label.cloneNode(true);
    $$(".opt", clone).forEach((n) => n.remove());
    return clone.textContent.trim();
  }

  // ---------- the infusion and level tables ----------

  function cellInput(attrs) {
    return el("input", { type: "text", inputmode: "decimal", autocomplete: "off",
      ...attrs });
  }

  function removeButton(tr, what) {
    const b = el("button", { type: "button", className: "remove secondary",
      "aria-label": `Remove this ${what}`, text: "Remove" });
    b.addEventListener("click", () => {
      tr.remove();
      renumber();
      hideResults();
    });
    return b;
  }

  function timeText(row) {
    if (row.time_h !== undefined) return String(row.time_h);
    if (row.datetime !== undefined) return String(row.datetime);
    return "";
  }

  function addInfusion(row = {}) {
    const tr = el("tr");
    tr.extra = Object.fromEntries(
      Object.entries(row).filter(([k]) => !INFUSION_KEYS.has(k)));
    tr.append(
      el("td", { className: "rownum" }),
      el("td", {}, cellInput({ "data-key": "time", value: timeText(row),
        inputmode: "text" })),
      el("td", {}, cellInput({ "data-key": "dose_IU", value: row.dose_IU ?? "" })),
      el("td", {}, cellInput({ "data-key": "duration_h",
        value: row.duration_h ?? "" })),
      el("td", {}, removeButton(tr, "infusion")),
    );
    $("#infusions tbody").append(tr);
    renumber();
    return tr;
  }

  function addLevel(row = {}) {
    const tr = el("tr");
    tr.extra = Object.fromEntries(
      Object.entries(row).filter(([k]) => !LEVEL_KEYS.has(k)));
    const unit = el("select", { "data-key": "unit" });
    const units = UNITS.includes(row.unit) || row.unit === undefined
      ? UNITS : [...UNITS, row.unit];
    for (const u of units) unit.append(el("option", { value: u, text: u }));
    unit.value = row.unit ?? "IU/dL";
    const blq = el("input", { type: "checkbox", "data-key": "blq" });
    blq.checked = row.blq === true;
    tr.append(
      el("td", { className: "rownum" }),
      el("td", {}, cellInput({ "data-key": "time", value: timeText(row),
        inputmode: "text" })),
      el("td", {}, cellInput({ "data-key": "value", value: row.value ?? "" })),
      el("td", {}, unit),
      el("td", { className: "center" }, blq),
      el("td", {}, cellInput({ "data-key": "lloq", value: row.lloq ?? "" })),
      el("td", {}, removeButton(tr, "level")),
    );
    $("#levels tbody").append(tr);
    renumber();
    return tr;
  }

  // Rows left completely empty are not sent; the others get data-field paths that
  // match their index in the request, so that errors land on the right cell.
  function rowIsEmpty(tr) {
    return $$("input[type=text]", tr).every((i) => i.value.trim() === "")
      && !$$("input[type=checkbox]", tr).some((i) => i.checked);
  }

  const COLUMN_NAMES = { time: "time (h)", dose_IU: "dose (IU)",
    duration_h: "duration (h)", value: "level", unit: "unit", blq: "BLQ",
    lloq: "LLOQ" };

  function renumber() {
    for (const [table, name, label] of [["infusions", "infusions", "Infusion"],
      ["levels", "levels", "Level"]]) {
      let index = 0;
      $$(`#${table} tbody tr`).forEach((tr, pos) => {
        const empty = rowIsEmpty(tr);
        $(".rownum", tr).textContent = String(pos + 1);
        for (const input of $$("[data-key]", tr)) {
          const key = input.dataset.key;
          const path = key === "time" ? "time_h" : key;
          input.setAttribute("aria-label",
            `${label} ${pos + 1}, ${COLUMN_NAMES[key]}`);
          if (empty) input.removeAttribute("data-field");
          else input.dataset.field = `${name}[${index}].${path}`;
        }
        if (!empty) index += 1;
      });
    }
  }

  // ---------- request <-> form ----------

  function readTime(input, obj) {
    const s = input.value.trim();
    if (s === "") return;
    const n = parseNumber(s);
    if (typeof n === "number") obj.time_h = n;
    else if (DATETIME.test(s)) obj.datetime = s;
    else obj.time_h = s;
  }

  function putNumber(obj, key, text) {
    const v = parseNumber(text);
    if (v !== undefined) obj[key] = v;
  }

  function buildRequest() {
    renumber();
    const req = { ...extras };
    const product = $("#product").value;
    if (product) req.product = product;
    for (const f of TEXT_FIELDS) {
      const v = $(`#${f}`).value.trim();
      if (v !== "") req[f] = v;
    }
    for (const f of NUMBER_FIELDS) putNumber(req, f, $(`#${f}`).value);
    for (const f of CHOICE_FIELDS) {
      const v = $(`#${f}`).value;
      if (v !== "") req[f] = v;
    }
    req.infusions = [];
    for (const tr of $$("#infusions tbody tr")) {
      if (rowIsEmpty(tr)) continue;
      const inf = { ...tr.extra };
      readTime($('[data-key="time"]', tr), inf);
      putNumber(inf, "dose_IU", $('[data-key="dose_IU"]', tr).value);
      putNumber(inf, "duration_h", $('[data-key="duration_h"]', tr).value);
      req.infusions.push(inf);
    }
    req.levels = [];
    for (const tr of $$("#levels tbody tr")) {
      if (rowIsEmpty(tr)) continue;
      const lev = { ...tr.extra };
      readTime($('[data-key="time"]', tr), lev);
      putNumber(lev, "value", $('[data-key="value"]', tr).value);
      lev.unit = $('[data-key="unit"]', tr).value;
      if ($('[data-key="blq"]', tr).checked) lev.blq = true;
      putNumber(lev, "lloq", $('[data-key="lloq"]', tr).value);
      req.levels.push(lev);
    }
    return req;
  }

  function setSelect(select, value) {
    if (value === undefined || value === null || value === "") {
      select.value = "";
      return;
    }
    const v = String(value);
    if (!$$("option", select).some((o) => o.value === v)) {
      select.append(el("option", { value: v, text: v }));
    }
    select.value = v;
  }

  function fillForm(req) {
    clearErrors();
    extras = Object.fromEntries(
      Object.entries(req).filter(([k]) => !FORM_FIELDS.has(k)));
    setSelect($("#product"), req.product ?? "");
    for (const f of [...TEXT_FIELDS, ...NUMBER_FIELDS]) {
      $(`#${f}`).value = req[f] === undefined || req[f] === null ? "" : String(req[f]);
    }
    for (const f of CHOICE_FIELDS) setSelect($(`#${f}`), req[f]);
    $("#infusions tbody").replaceChildren();
    $("#levels tbody").replaceChildren();
    const infusions = Array.isArray(req.infusions) ? req.infusions : [];
    const levels = Array.isArray(req.levels) ? req.levels : [];
    infusions.forEach((r) => addInfusion(r && typeof r === "object" ? r : {}));
    levels.forEach((r) => addLevel(r && typeof r === "object" ? r : {}));
    if (!infusions.length) addInfusion();
    if (!levels.length) addLevel();
    showProductInfo();
    const note = $("#file-note");
    const kept = Object.keys(extras);
    note.hidden = kept.length === 0;
    note.textContent = kept.length
      ? `Also sent from the file (not editable here): ${kept.join(", ")}.` : "";
  }

  function loadFile(file) {
    const reader = new FileReader();
    reader.onload = () => {
      let req;
      try {
        req = JSON.parse(reader.result);
      } catch (e) {
        showGeneral([{ field: "", message:
          `${file.name} is not valid JSON (${e.message}); the form was not changed.` }]);
        return;
      }
      if (!req || typeof req !== "object" || Array.isArray(req)) {
        showGeneral([{ field: "", message:
          `${file.name} does not hold a request object; the form was not changed.` }]);
        return;
      }
      hideResults();
      fillForm(req);
      setStatus(`Loaded ${file.name}. Check the form, then press Calculate.`);
    };
    reader.onerror = () => showGeneral([{ field: "",
      message: `Could not read ${file.name}.` }]);
    reader.readAsText(file);
  }

  // ---------- products ----------

  function showProductInfo() {
    const p = products.find((x) => x.name === $("#product").value);
    const info = $("#product-info");
    if (!p) {
      info.textContent = "";
      return;
    }
    const parts = [`${p.factor ?? ""}, ${p.half_life_class ?? ""} half-life`];
    const range = p.validated_range || {};
    const span = (v, unit) => (Array.isArray(v) && v[0] !== null && v[1] !== null
      ? `${plain(v[0])}–${plain(v[1])} ${unit}` : "");
    const ranges = [span(range.AGE, "y"), span(range.WT, "kg")].filter(Boolean);
    if (ranges.length) parts.push(`built on patients of ${ranges.join(", ")}`);
    if (p.citation) parts.push(`model: ${p.citation}`);
    info.textContent = parts.join("; ");
  }

  async function loadProducts() {
    try {
      const resp = await fetch("/api/products");
      if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
      products = await resp.json();
    } catch (e) {
      showGeneral([{ field: "", message:
        `Could not load the product list (${e.message}).` }]);
      return;
    }
    const select = $("#product");
    const current = select.value;
    select.replaceChildren(...products.map((p) => el("option", { value: p.name,
      text: `${p.product} [${p.name}] – ${p.factor}` })));
    setSelect(select, current || DEFAULT_REQUEST.product);
    showProductInfo();
  }

  // ---------- errors ----------

  function findInput(field) {
    const esc = (f) => (window.CSS && CSS.escape ? CSS.escape(f) : f);
    return $(`[data-field="${esc(field)}"]`, form)
      // a row given as a date-time: its time cell carries the time_h path
      || $(`[data-field="${esc(field.replace(/\.datetime$/, ".time_h"))}"]`, form);
  }

  // aria-describedby of an input in error: its error message, then its own hint.
  function describe(input, errorId) {
    if (input.dataset.describedby === undefined) {
      input.dataset.describedby = input.getAttribute("aria-describedby") || "";
    }
    input.setAttribute("aria-describedby",
      `${errorId} ${input.dataset.describedby}`.trim());
  }

  function clearFieldError(input) {
    input.removeAttribute("aria-invalid");
    if (input.dataset.describedby) {
      input.setAttribute("aria-describedby", input.dataset.describedby);
    } else {
      input.removeAttribute("aria-describedby");
    }
    const next = input.nextElementSibling;
    if (next && next.classList.contains("field-error")) next.remove();
  }

  function clearErrors() {
    $$("[aria-invalid]", form).forEach(clearFieldError);
    $$(".field-error", form).forEach((n) => n.remove());
    const box = $("#general-errors");
    box.hidden = true;
    box.replaceChildren();
  }

  function showGeneral(errors, fieldCount = 0) {
    const box = $("#general-errors");
    box.replaceChildren();
    if (errors.length) {
      box.append(el("p", { className: "box-title",
        text: "The calculation was not run:" }));
      const ul = el("ul");
      for (const e of errors) {
        const li = el("li");
        if (e.field) li.append(el("strong", { text: `${fieldLabel(e.field)}: ` }));
        li.append(e.message);
        ul.append(li);
      }
      box.append(ul);
    }
    if (fieldCount) {
      box.append(el("p", { text: fieldCount === 1
        ? "1 entry needs correcting; it is marked below."
        : `${fieldCount} entries need correcting; they are marked below.` }));
    }
    box.hidden = box.childElementCount === 0;
  }

  function showErrors(errors) {
    clearErrors();
    const general = [];
    let first = null;
    let placed = 0;
    for (const e of errors) {
      const input = e.field ? findInput(e.field) : null;
      if (!input) {
        general.push(e);
        continue;
      }
      let msg = input.nextElementSibling;
      if (!msg || !msg.classList.contains("field-error")) {
        msg = el("div", { className: "field-error", role: "alert",
          id: `err-${++idCounter}` });
        input.after(msg);
        input.setAttribute("aria-invalid", "true");
        describe(input, msg.id);
        placed += 1;
      }
      const line = el("span", { className: "msg" });
      line.append(el("span", { className: "what", text: `${fieldLabel(e.field)}: ` }),
        e.message);
      msg.append(line);
      if (!first) first = input;
    }
    showGeneral(general, placed);
    if (first) first.focus();
    else if (general.length) $("#general-errors").focus();
  }

  // ---------- results ----------

  const ESTIMATES = [
    ["half_life_h", "Terminal half-life", "h"],
    ["effective_half_life_h", "Effective half-life", "h"],
    ["clearance_dL_h", "Clearance", "dL/h"],
    ["clearance_mL_h_kg", "Clearance per kg", "mL/h/kg"],
    ["v1_dL", "Central volume (V1)", "dL"],
    ["vss_dL", "Volume at steady state (Vss)", "dL"],
    ["incremental_recovery", "Incremental recovery", "IU/dL per IU/kg"],
  ];

  function estimateRow(key, label, unit, est, inf = "∞") {
    return el("tr", { "data-estimate": key },
      el("th", { scope: "row", text: label }),
      el("td", { className: "num median", text: fmt(est ? est.median : null, inf) }),
      el("td", { className: "num interval", text: fmtInterval(est, inf) }),
      el("td", { text: unit }));
  }

  // A plain number, or an estimate shown as its median with the 90% interval.
  function numberOrEstimateCell(x) {
    const td = el("td", { className: "num" });
    if (x && typeof x === "object" && (x.median === null || x.median === undefined)) {
      td.append("–");
    } else if (x && typeof x === "object") {
      td.append(fmt(x.median), el("span", { className: "ci",
        text: ` (${fmtInterval(x)})` }));
    } else {
      td.append(fmt(x));
    }
    return td;
  }

  function thresholdKeys(obj) {
    return Object.keys(obj || {}).sort((a, b) => Number(a) - Number(b));
  }

  function showResults(data) {
    const r = data.result;
    const model = r.model || {};
    const who = r.patient_id ? `Patient ${r.patient_id}` : "Patient";
    const cov = r.covariates || {};
    const about = [cov.WT ? `${plain(cov.WT.value)} kg` : "",
      cov.AGE ? `${plain(cov.AGE.value)} y` : ""].filter(Boolean);
    $("#summary").textContent = [
      `${[who, ...about].join(", ")}.`,
      `Model: ${model.name ?? r.product ?? ""}${model.citation ? ` (${model.citation})` : ""}.`,
      `Method: ${String(r.method).toUpperCase()}; ${r.uncertainty ?? ""}.`,
    ].join(" ");

    const warnings = [...(r.warnings || [])];
    if (model.unverified && model.unverified.length) {
      warnings.push({ field: "", message: "Model values not yet checked against the "
        + `primary publication: ${model.unverified.join(", ")}.` });
    }
    const wl = $("#warning-list");
    wl.replaceChildren(...warnings.map((w) => {
      const li = el("li");
      if (w.field) li.append(el("strong", { text: `${fieldLabel(w.field)}: ` }));
      li.append(w.message);
      return li;
    }));
    $("#warnings").hidden = warnings.length === 0;

    const img = $("#curve");
    img.src = `data:image/png;base64,${data.curve_png_base64}`;
    img.alt = `Predicted factor activity over time for ${who.toLowerCase()}, `
      + "with 50% and 90% prediction intervals and the measured levels.";

    const rows = ESTIMATES.map(([k, label, unit]) => estimateRow(k, label, unit, r[k]));
    for (const t of thresholdKeys(r.time_to_threshold_h)) {
      rows.push(estimateRow(`time_to_threshold_h.${t}`,
        `Time to ${t} IU/dL after the last infusion`, "h", r.time_to_threshold_h[t],
        "not reached"));
    }
    for (const t of thresholdKeys(r.time_to_threshold_after_standard_dose_h)) {
      rows.push(estimateRow(`time_to_threshold_after_standard_dose_h.${t}`,
        `Time to ${t} IU/dL after ${fmt(r.standard_dose_IU)} IU (standard dose)`, "h",
        r.time_to_threshold_after_standard_dose_h[t], "not reached"));
    }
    $("#estimates tbody").replaceChildren(...rows);

    $("#regimen-note").textContent = "Smallest dose that keeps the trough at or above "
      + `the target with probability ${fmtPercent(r.trough_probability)}.`;
    const regimens = [...(r.regimens || [])].sort((a, b) =>
      (a.interval_h - b.interval_h) || (a.target_IU_dL - b.target_IU_dL));
    $("#regimens tbody").replaceChildren(...regimens.map((g) => {
      const reachable = g.dose_IU !== null && g.dose_IU !== undefined;
      return el("tr", { className: reachable ? "" : "unreachable" },
        el("td", { className: "num", text: fmt(g.interval_h) }),
        el("td", { className: "num", text: fmt(g.target_IU_dL) }),
        el("td", { className: "num dose", text: reachable ? fmt(g.dose_IU)
          : "not reachable" }),
        el("td", { className: "num", text: fmt(g.dose_IU_kg) }),
        el("td", { className: "num", text: fmtPercent(g.trough_prob) }),
        numberOrEstimateCell(g.peak_IU_dL),
        numberOrEstimateCell(g.hours_below_target_per_week));
    }));

    const cur = $("#current-regimen");
    if (r.current_regimen) {
      const probs = r.current_regimen_trough_prob || {};
      const ps = thresholdKeys(probs)
        .map((t) => `≥ ${t} IU/dL: ${fmtPercent(probs[t])}`).join(", ");
      cur.textContent = `Current regimen ${fmt(r.current_regimen.dose_IU)} IU every `
        + `${fmt(r.current_regimen.interval_h)} h; probability that the trough stays `
        + `${ps}.`;
      cur.hidden = false;
    } else {
      cur.hidden = true;
    }

    $("#level-fit tbody").replaceChildren(...(r.levels || []).map((l) => el("tr", {},
      el("td", { className: "num", text: fmt(l.time_h) }),
      el("td", { className: "num", text: l.blq
        ? `BLQ${Number.isFinite(l.lloq_IU_dL) ? ` (< ${fmt(l.lloq_IU_dL)})` : ""}`
        : fmt(l.value_IU_dL) }),
      el("td", { className: "num", text: fmt(l.predicted ? l.predicted.median : null) }),
      el("td", { className: "num", text: fmtInterval(l.predicted) }))));

    $("#report-link").href = `/api/report/${encodeURIComponent(data.report_id)}`;
    if (jsonUrl) URL.revokeObjectURL(jsonUrl);
    jsonUrl = URL.createObjectURL(new Blob([JSON.stringify(r, null, 2)],
      { type: "application/json" }));
    $("#json-link").href = jsonUrl;

    $("#results").hidden = false;
    $("#results-title").focus();
  }

  function hideResults() {
    // Results of an earlier input must never sit next to a changed form.
    $("#results").hidden = true;
  }

  // ---------- calculate ----------

  function setStatus(text) {
    $("#status").textContent = text;
  }

  function setBusy(busy) {
    $("#calculate").disabled = busy;
    form.setAttribute("aria-busy", busy ? "true" : "false");
  }

  async function calculate(event) {
    event.preventDefault();
    clearErrors();
    hideResults();
    const method = $("#method").value;
    const request = buildRequest();
    setBusy(true);
    setStatus(method === "nuts"
      ? "Calculating (full posterior; this can take a minute)…"
      : "Calculating… (the first calculation after a server start takes longer)");
    try {
      const resp = await fetch(`/api/dose?method=${encodeURIComponent(method)}`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(request),
      });
      if (resp.ok) {
        showResults(await resp.json());
        setStatus("Done.");
      } else {
        // 422 (input), 413 (body too large), 415 (not JSON) and 503 (busy or
        // over the time limit) all carry {"errors": [{field, message}]}: each is
        // shown at its field; anything else (e.g. a 500) as plain text.
        const text = await resp.text();
        let body = null;
        try { body = JSON.parse(text); } catch (_) { body = null; }
        if (body && Array.isArray(body.errors) && body.errors.length) {
          showErrors(body.errors);
          setStatus(resp.status === 422 ? "Please correct the input."
            : resp.status === 503 ? "Not calculated: the server could not take "
              + "this calculation now." : "The server refused the request.");
        } else {
          showGeneral([{ field: "", message: `${text} (HTTP ${resp.status})` }]);
          setStatus("");
          $("#general-errors").focus();
        }
      }
    } catch (e) {
      showGeneral([{ field: "", message: `Cannot reach the server (${e.message}).` }]);
      setStatus("");
    } finally {
      setBusy(false);
    }
  }

  // ---------- wiring ----------

  document.addEventListener("DOMContentLoaded", () => {
    fillForm(DEFAULT_REQUEST);
    loadProducts();
    form.addEventListener("submit", calculate);
    $("#add-infusion").addEventListener("click", () => {
      $("input", addInfusion()).focus();
    });
    $("#add-level").addEventListener("click", () => {
      $("input", addLevel()).focus();
    });
    $("#product").addEventListener("change", showProductInfo);
    $("#request-file").addEventListener("change", (ev) => {
      const file = ev.target.files && ev.target.files[0];
      if (file) loadFile(file);
      ev.target.value = "";
    });
    // Editing a field withdraws its error and any results of the old input.
    form.addEventListener("input", (ev) => {
      const t = ev.target;
      if (t.getAttribute && t.getAttribute("aria-invalid") === "true") {
        clearFieldError(t);
      }
      if (t.id !== "request-file") hideResults();
    });
  });
})();
