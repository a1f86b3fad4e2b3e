// The dosing page: builds a dosing request (data_schemas/dosing_request.schema.json)
// from the form, posts it to /api/dose and shows the result or, for bad input, each
// error next to its field. Every number and text of a result comes from the
// server (result.display): the page formats none. With a patient history
// (phems serve --db) it saves assessments and shows earlier ones. Plain
// JavaScript, no libraries, nothing loaded from outside this server. The server
// validates; the page only shapes the request.
"use strict";

(() => {
  // The example patient behind "Load example", clearly labelled on the page.
  const EXAMPLE_REQUEST = {
    patient_id: "EXAMPLE",
    product: "kovaltry",
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
  const NUMBER_FIELDS = ["age_y", "height_cm", "vwf_IU_dL"];
  const TEXT_FIELDS = ["patient_id"];
  const CHOICE_FIELDS = ["blood_group", "assay"];
  const FORM_FIELDS = new Set(["product", ...NUMBER_FIELDS, ...TEXT_FIELDS,
    ...CHOICE_FIELDS, "infusions", "levels", "weight_kg", "weight_lb",
    "acknowledge_unverified"]);
  // options with an input on the page; other options are kept as sent
  const OPTION_FIELDS = new Set(["targets_IU_dL", "schedules", "trough_probability",
    "max_dose_IU_kg", "evaluate"]);
  const INFUSION_KEYS = new Set(["time_h", "datetime", "dose_IU", "duration_h"]);
  const LEVEL_KEYS = new Set(["time_h", "datetime", "value", "unit", "blq", "lloq"]);
  const UNITS = ["IU/dL", "IU/mL", "%"];
  // ISO 8601 or a clinic's day-first date (01/03/2024 08:30, 01.03.2024, 01-03-2024)
  const DATETIME = /^(\d{4}-\d{2}-\d{2}|\d{1,2}[./-]\d{1,2}[./-]\d{4})[T ]\d{1,2}:\d{2}/;

  const $ = (sel, root = document) => root.querySelector(sel);
  const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
  const form = $("#dose-form");
  let products = [];
  let extras = {};          // request fields from a loaded file that the form lacks
  let extraOptions = {};    // options from a loaded file that the form lacks
  let jsonUrl = null;       // blob: URL of the current result.json
  let idCounter = 0;
  let historyEnabled = false;
  let current = null;       // {report_id, patient_id} of the shown result

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

  // "levels[1].value" -> "Level 2, value" (for messages not shown next to an input).
  const FIELD_NAMES = { infusions: "Infusions", levels: "Measured levels",
    model: "Model file", options: "Options", baseline: "Baseline level",
    method: "Method", "Content-Type": "Request format", report_id: "Saving",
    assessment_id: "Assessment" };

  function fieldLabel(field) {
    if (!field) return "Request";
    const input = findInput(field);
    if (input) return input.getAttribute("aria-label") || labelText(input) || field;
    if (FIELD_NAMES[field]) return FIELD_NAMES[field];
    return field
      .replace(/^infusions\[(\d+)\]/, (_, i) => `Infusion ${Number(i) + 1}`)
      .replace(/^levels\[(\d+)\]/, (_, i) => `Level ${Number(i) + 1}`)
      .replace(/^options\.evaluate\[(\d+)\]/, (_, i) => `Evaluated regimen ${Number(i) + 1}`)
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

  function addEvaluate(row = {}) {
    const tr = el("tr");
    const unit = el("select", { "data-key": "dose_unit", "aria-label": "Dose unit" });
    for (const u of ["IU", "IU/kg"]) unit.append(el("option", { value: u, text: u }));
    unit.value = row.dose_IU_kg !== undefined ? "IU/kg" : "IU";
    tr.append(
      el("td", { className: "rownum" }),
      el("td", {}, cellInput({ "data-key": "schedule", inputmode: "text",
        "aria-label": "Schedule", value: row.schedule ?? "" })),
      el("td", {}, cellInput({ "data-key": "dose", "aria-label": "Dose",
        value: row.dose_IU_kg ?? row.dose_IU ?? "" })),
      el("td", {}, unit),
      el("td", {}, removeButton(tr, "regimen")),
    );
    $("#evaluate tbody").append(tr);
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
    let index = 0;
    $$("#evaluate tbody tr").forEach((tr, pos) => {
      const empty = rowIsEmpty(tr);
      $(".rownum", tr).textContent = String(pos + 1);
      const perKg = $('[data-key="dose_unit"]', tr).value === "IU/kg";
      const paths = { schedule: "schedule", dose: perKg ? "dose_IU_kg" : "dose_IU" };
      for (const input of $$("input[data-key]", tr)) {
        const key = input.dataset.key;
        input.setAttribute("aria-label", `Evaluated regimen ${pos + 1}, ${key}`);
        if (empty) input.removeAttribute("data-field");
        else input.dataset.field = `options.evaluate[${index}].${paths[key]}`;
      }
      if (!empty) index += 1;
    });
  }

  // "1, 3; 5" -> [1, 3, 5] (a number typed with a decimal comma needs a space
  // after the list's comma: "1,5" is 1.5); undefined when empty.
  function parseList(text) {
    const s = text.trim();
    if (s === "") return undefined;
    return s.split(/[;\s]+|,\s+/).filter(Boolean).map((t) => parseNumber(t));
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
    putNumber(req, $("#weight-unit").value === "lb" ? "weight_lb" : "weight_kg",
      $("#weight").value);
    for (const f of CHOICE_FIELDS) {
      const v = $(`#${f}`).value;
      if (v !== "") req[f] = v;
    }
    if (!$("#unverified-box").hidden && $("#acknowledge_unverified").checked) {
      req.acknowledge_unverified = true;
    }
    const options = { ...extraOptions };
    const targets = parseList($("#targets").value);
    if (targets !== undefined) options.targets_IU_dL = targets;
    const schedules = $("#schedules").value.split("\n").map((x) => x.trim())
      .filter(Boolean);
    if (schedules.length) options.schedules = schedules;
    putNumber(options, "trough_probability", $("#probability").value);
    putNumber(options, "max_dose_IU_kg", $("#cap").value);
    const evaluate = [];
    for (const tr of $$("#evaluate tbody tr")) {
      if (rowIsEmpty(tr)) continue;
      const reg = {};
      const sched = $('[data-key="schedule"]', tr).value.trim();
      if (sched) reg.schedule = sched;
      putNumber(reg, $('[data-key="dose_unit"]', tr).value === "IU/kg"
        ? "dose_IU_kg" : "dose_IU", $('[data-key="dose"]', tr).value);
      evaluate.push(reg);
    }
    if (evaluate.length) options.evaluate = evaluate;
    if (Object.keys(options).length) req.options = options;
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

  function textOf(v) {
    return v === undefined || v === null ? "" : String(v);
  }

  function fillForm(req, { example = false } = {}) {
    clearErrors();
    extras = Object.fromEntries(
      Object.entries(req).filter(([k]) => !FORM_FIELDS.has(k) && k !== "options"));
    const opts = req.options && typeof req.options === "object"
      && !Array.isArray(req.options) ? req.options : {};
    extraOptions = Object.fromEntries(
      Object.entries(opts).filter(([k]) => !OPTION_FIELDS.has(k)));
    if (req.options !== undefined && req.options !== opts) extras.options = req.options;
    setSelect($("#product"), req.product ?? "");
    for (const f of [...TEXT_FIELDS, ...NUMBER_FIELDS]) $(`#${f}`).value = textOf(req[f]);
    const lb = req.weight_lb !== undefined && req.weight_kg === undefined;
    $("#weight-unit").value = lb ? "lb" : "kg";
    $("#weight").value = textOf(lb ? req.weight_lb : req.weight_kg);
    setWeightField();
    $("#acknowledge_unverified").checked = req.acknowledge_unverified === true;
    for (const f of CHOICE_FIELDS) setSelect($(`#${f}`), req[f]);
    $("#targets").value = Array.isArray(opts.targets_IU_dL)
      ? opts.targets_IU_dL.join(", ") : textOf(opts.targets_IU_dL);
    $("#schedules").value = Array.isArray(opts.schedules)
      ? opts.schedules.join("\n") : textOf(opts.schedules);
    $("#probability").value = textOf(opts.trough_probability);
    $("#cap").value = textOf(opts.max_dose_IU_kg);
    $("#evaluate tbody").replaceChildren();
    (Array.isArray(opts.evaluate) ? opts.evaluate : []).forEach(
      (r) => addEvaluate(r && typeof r === "object" ? r : {}));
    if (!$$("#evaluate tbody tr").length) addEvaluate();
    $("#example-note").hidden = !example;
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
    const kept = [...Object.keys(extras),
      ...Object.keys(extraOptions).map((k) => `options.${k}`)];
    note.hidden = kept.length === 0;
    note.textContent = kept.length
      ? `Also sent from the file (not editable here): ${kept.join(", ")}.` : "";
  }

  function setWeightField() {
    const lb = $("#weight-unit").value === "lb";
    $("#weight").dataset.field = lb ? "weight_lb" : "weight_kg";
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

  const SECTION_NAMES = { fixed_effects: "typical values", covariates: "covariate effects",
    iiv: "between-patient variability", iov: "between-occasion variability",
    residual: "residual error", vial_sizes_IU: "vial sizes" };

  function showProductInfo() {
    const p = products.find((x) => x.name === $("#product").value);
    const info = $("#product-info");
    const box = $("#unverified-box");
    if (!p) {
      info.textContent = "";
      $("#product-choose").textContent = "";
      box.hidden = true;
      return;
    }
    const pop = p.population && typeof p.population === "object" ? p.population : {};
    const parts = [`${p.factor ?? ""}, ${p.half_life_class ?? ""} half-life`];
    if (p.ages) parts.push(`model built on patients aged ${p.ages}`);
    if (pop.N) parts.push(`${pop.N} patients`);
    if (p.assay) parts.push(`levels measured by ${p.assay} assay`);
    if (p.citation) parts.push(`model: ${p.citation}`);
    info.textContent = parts.join("; ");
    $("#product-choose").textContent = p.choose_when ? `When to choose it: ${p.choose_when}` : "";
    const sections = (p.unverified || []).map((x) => SECTION_NAMES[x] || x);
    box.hidden = sections.length === 0;
    $("#unverified-sections").textContent = sections.join(", ");
    $("#unverified-text").textContent = sections.length
      ? `${p.display}: ${sections.join(", ")} not verified against the primary `
        + "publication. It can be used only with your acknowledgement, which is "
        + "recorded in the result." : "";
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
    const chosen = select.value;
    const groups = [["FVIII", "Factor VIII"], ["FIX", "Factor IX"]].map(([f, name]) => {
      const g = el("optgroup", { label: name });
      for (const p of products.filter((x) => x.factor === f)) {
        g.append(el("option", { value: p.name, text: p.display || p.name }));
      }
      return g;
    }).filter((g) => g.childElementCount);
    const other = products.filter((x) => x.factor !== "FVIII" && x.factor !== "FIX")
      .map((p) => el("option", { value: p.name, text: p.display || p.name }));
    select.replaceChildren(el("option", { value: "", text: "— choose a product —" }),
      ...groups, ...other);
    setSelect(select, chosen);
    showProductInfo();
  }

  // ---------- errors ----------

  function findInput(field) {
    const esc = (f) => (window.CSS && CSS.escape ? CSS.escape(f) : f);
    return $(`[data-field="${esc(field)}"]`, form)
      // a row given as a date-time: its time cell carries the time_h path
      || $(`[data-field="${esc(field.replace(/\.datetime$/, ".time_h"))}"]`, form)
      // one entry of a list typed in one input (options.schedules[1])
      || $(`[data-field="${esc(field.replace(/\[\d+\]$/, ""))}"]`, form)
      // weight given in the other unit
      || (/^weight_(kg|lb)$/.test(field) ? $("#weight") : null);
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

  // ---------- results (all text from result.display) ----------

  function fillTable(table, data) {
    const cols = (data && data.columns) || [];
    const rows = (data && data.rows) || [];
    table.replaceChildren(
      el("thead", {}, el("tr", {}, ...cols.map((c) => el("th", { scope: "col", text: c })))),
      el("tbody", {}, ...rows.map((r) => el("tr", {}, ...r.map((c, i) => (i === 0
        ? el("th", { scope: "row", text: textOf(c) })
        : el("td", { text: textOf(c) })))))));
    return rows.length;
  }

  function fillList(list, box, items) {
    list.replaceChildren(...(items || []).map((t) => el("li", { text: t })));
    box.hidden = !(items && items.length);
  }

  function showResults(data) {
    const r = data.result;
    const d = r.display || {};
    $("#result-title").textContent = d.title || "";
    $("#summary").replaceChildren(...(d.summary || []).flatMap((item) => [
      el("dt", { text: item.label }), el("dd", { text: item.value })]));
    fillList($("#warning-list"), $("#warnings"), d.warnings);
    fillList($("#note-list"), $("#notes-box"), d.notes);
    const comparison = d.comparison;
    $("#comparison-box").hidden = !(comparison && fillTable($("#comparison"), comparison));

    const img = $("#curve");
    img.src = `data:image/png;base64,${data.curve_png_base64}`;
    img.alt = `Predicted factor activity over time${r.patient_id ? ` for ${r.patient_id}` : ""}, `
      + "with 50% and 90% prediction intervals and the measured levels.";

    fillTable($("#regimens"), d.regimen_table);
    $("#evaluated-box").hidden = !fillTable($("#evaluated"), d.evaluated_table);
    fillTable($("#level-fit"), d.levels_table);

    $("#report-link").href = `/api/report/${encodeURIComponent(data.report_id)}`;
    if (jsonUrl) URL.revokeObjectURL(jsonUrl);
    jsonUrl = URL.createObjectURL(new Blob([JSON.stringify(r, null, 2)],
      { type: "application/json" }));
    $("#json-link").href = jsonUrl;

    current = { report_id: data.report_id, patient_id: r.patient_id,
      assessment_id: data.assessment_id ?? null };
    historyEnabled = data.history_enabled ?? historyEnabled;
    const save = $("#save");
    save.hidden = !historyEnabled;
    save.disabled = current.assessment_id !== null;
    $("#save-status").textContent = current.assessment_id !== null
      ? `Saved assessment ${current.assessment_id} (${data.assessed_at || ""}).` : "";

    $("#results").hidden = false;
    $("#results-title").focus();
  }

  // ---------- patient history (phems serve --db) ----------

  async function getJson(url, options) {
    const resp = await fetch(url, options);
    const text = await resp.text();
    let body = null;
    try { body = JSON.parse(text); } catch (_) { body = null; }
    if (!resp.ok) {
      const errors = body && Array.isArray(body.errors) && body.errors.length
        ? body.errors : [{ field: "", message: `${text} (HTTP ${resp.status})` }];
      throw Object.assign(new Error("refused"), { errors });
    }
    return body;
  }

  function showHistoryError(e) {
    showGeneral(e.errors || [{ field: "", message:
      `Cannot reach the server (${e.message}).` }]);
    $("#general-errors").focus();
  }

  async function loadPatients(select = "") {
    let body;
    try {
      body = await getJson("/api/patients");
    } catch (e) {
      showHistoryError(e);
      return;
    }
    historyEnabled = body.enabled;
    $("#history-tools").hidden = !historyEnabled;
    const list = $("#patient-list");
    list.replaceChildren(el("option", { value: "", text: "—" }),
      ...body.patients.map((p) => el("option", { value: p.patient_id,
        text: `${p.patient_id} (${p.n_assessments})` })));
    setSelect(list, select);
  }

  async function showHistory(patientId) {
    if (!historyEnabled || !patientId) return;
    let body;
    try {
      body = await getJson(`/api/patients/${encodeURIComponent(patientId)}`);
    } catch (e) {
      if (!(e.errors && e.errors[0] && e.errors[0].field === "patient_id")) {
        showHistoryError(e);
      }
      $("#history").hidden = true;  // a new patient: no history yet
      return;
    }
    $("#history-who").textContent = `Patient ${body.patient_id}: `
      + `${body.assessments.length} saved assessment(s), earliest first.`;
    const table = $("#history-table");
    fillTable(table, { columns: [...body.table.columns, ""], rows: [] });
    $("tbody", table).replaceChildren(...body.table.rows.map((row, i) => {
      const a = body.assessments[i];
      const open = el("button", { type: "button", className: "secondary open",
        "data-assessment": a.assessment_id, text: "Reopen",
        "aria-label": `Reopen the assessment of ${row[0]}` });
      open.addEventListener("click", () => reopen(a.assessment_id));
      return el("tr", { "data-assessment": a.assessment_id },
        el("th", { scope: "row", text: row[0] }),
        ...row.slice(1).map((c) => el("td", { text: textOf(c) })), el("td", {}, open));
    }));
    $("#history").hidden = false;
  }

  async function save() {
    if (!current) return;
    $("#save").disabled = true;
    $("#save-status").textContent = "Saving…";
    try {
      const body = await getJson("/api/assessments", { method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ report_id: current.report_id }) });
      current.assessment_id = body.assessment_id;
      $("#save-status").textContent = `Saved assessment ${body.assessment_id} of `
        + `patient ${body.patient_id} (${body.assessed_at}).`;
      await loadPatients(body.patient_id);
      await showHistory(body.patient_id);
    } catch (e) {
      $("#save").disabled = false;
      $("#save-status").textContent = "Not saved.";
      if (e.errors) showErrors(e.errors);
      else showHistoryError(e);
    }
  }

  async function reopen(assessmentId) {
    setStatus("Opening the saved assessment…");
    try {
      const body = await getJson(`/api/assessments/${encodeURIComponent(assessmentId)}`);
      fillForm(body.request);
      showResults({ ...body, history_enabled: true });
      setStatus(`Reopened assessment ${body.assessment_id} of patient `
        + `${body.patient_id} (${body.assessed_at}).`);
    } catch (e) {
      setStatus("");
      showHistoryError(e);
    }
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
        const data = await resp.json();
        showResults(data);
        setStatus("Done.");
        if (data.history_enabled && data.result.patient_id) {
          showHistory(data.result.patient_id);
        }
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

  function newPatient() {
    hideResults();
    fillForm({});
    $("#history").hidden = true;
    $("#patient-list").value = "";
    setStatus("");
    $("#product").focus();
  }

  document.addEventListener("DOMContentLoaded", () => {
    // The page starts empty: a patient is entered, loaded from a file, reopened
    // from the history, or the labelled example is loaded on request.
    fillForm({});
    loadProducts();
    loadPatients();
    $("#new-patient").addEventListener("click", newPatient);
    $("#load-example").addEventListener("click", () => {
      hideResults();
      $("#history").hidden = true;
      fillForm(EXAMPLE_REQUEST, { example: true });
      setStatus("Example patient loaded.");
    });
    $("#save").addEventListener("click", save);
    $("#open-history").addEventListener("click", () => {
      const id = $("#patient-list").value;
      if (id) showHistory(id);
    });
    $("#weight-unit").addEventListener("change", () => {
      clearFieldError($("#weight"));
      setWeightField();
    });
    $("#add-evaluate").addEventListener("click", () => {
      $("input", addEvaluate()).focus();
    });
    $("#evaluate").addEventListener("change", (ev) => {
      if (ev.target.dataset.key === "dose_unit") renumber();
    });
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
