// The playground: controls from the catalog, the request through the API's code path, live previews.
"use strict";
(function () {
  var form = document.getElementById("playground");
  if (!form) return;
  var catalog = JSON.parse(document.getElementById("catalog").textContent);
  var csrf = document.querySelector('meta[name="csrf-token"]').getAttribute("content");
  var byName = {};
  catalog.forEach(function (m) { byName[m.name] = m; });
  var $ = function (id) { return document.getElementById(id); };
  var model = $("p-model"), size = $("p-size"), sizeFree = $("p-size-free"), quality = $("p-quality");
  var format = $("p-format"), background = $("p-background"), n = $("p-n"), stream = $("p-stream");
  var partials = $("p-partials"), moderation = $("p-moderation");
  var statusLine = $("p-status"), results = $("p-results"), preview = $("p-preview"), previewBox = $("p-preview-box");
  var count = $("p-partial-count"), costOut = $("p-cost"), ridOut = $("p-request-id");
  var objectUrls = [];

  function options(select, values, chosen) {
    select.innerHTML = "";
    values.forEach(function (v) {
      var o = document.createElement("option");
      o.value = v; o.textContent = v;
      if (v === chosen) o.selected = true;
      select.appendChild(o);
    });
  }
  function fieldOf(param) { return form.querySelector('[data-param="' + param + '"]'); }
  function showField(param, on) { var f = fieldOf(param); if (f) f.hidden = !on; }
  function mode() { return form.querySelector('input[name="mode"]:checked').value; }

  function applyModel() {
    var m = byName[model.value];
    var sizes = m.sizes.slice();
    if (m.free_size) sizes.push("custom");
    options(size, sizes, m.default_size);
    sizeFree.hidden = true;
    options(quality, m.qualities, m.default_quality);
    showField("output_format", m.output_formats.length > 0);
    options(format, m.output_formats, "png");
    showField("background", m.background);
    options(background, m.transparent_background ? ["auto", "opaque", "transparent"] : ["auto", "opaque"], "auto");
    showField("moderation", m.moderation);
    n.max = String(m.n_max);
    if (Number(n.value) > m.n_max) n.value = String(m.n_max);
    showField("stream", m.stream);
    stream.checked = stream.checked && m.stream;
    partials.max = String(m.max_partial_images);
    showField("partial_images", m.stream && stream.checked);
    var editable = !!m.edit;
    form.querySelector('input[name="mode"][value="edit"]').disabled = !editable;
    if (!editable && mode() === "edit") form.querySelector('input[name="mode"][value="generate"]').checked = true;
    if (m.edit) $("p-mask").disabled = !m.edit.mask;
    applyMode();
  }
  function applyMode() {
    var edit = mode() === "edit";
    form.querySelectorAll(".edit-only").forEach(function (el) { el.hidden = !edit; });
    $("p-go").textContent = edit ? "Edit" : "Generate";
  }
  model.addEventListener("change", applyModel);
  size.addEventListener("change", function () {
    sizeFree.hidden = size.value !== "custom";
    if (!sizeFree.hidden) sizeFree.focus();
  });
  stream.addEventListener("change", function () { showField("partial_images", stream.checked); });
  form.querySelectorAll('input[name="mode"]').forEach(function (r) { r.addEventListener("change", applyMode); });
  applyModel();

  function clearErrors() {
    form.querySelectorAll("[data-error-for]").forEach(function (el) { el.hidden = true; el.textContent = ""; });
    form.querySelectorAll("[aria-invalid]").forEach(function (el) { el.removeAttribute("aria-invalid"); });
  }
  function showError(error) {
    var param = (error && error.param) || "_";
    var slot = form.querySelector('[data-error-for="' + param.split(".")[0].replace("[]", "") + '"]');
    if (!slot || slot.parentElement.closest("[hidden]")) slot = form.querySelector('[data-error-for="_"]');
    slot.textContent = (error && error.message) || "The request failed.";
    slot.hidden = false;
    var input = slot.parentElement.querySelector("input, select, textarea");
    if (input && slot.getAttribute("data-error-for") !== "_") {
      input.setAttribute("aria-invalid", "true");
      input.focus();
    }
    statusLine.textContent = "Refused: " + slot.textContent;
  }
  function blobOf(b64, fmt) {
    var raw = atob(b64), bytes = new Uint8Array(raw.length);
    for (var i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
    return new Blob([bytes], { type: "image/" + (fmt || "png") });
  }
  function urlOf(b64, fmt) {
    var url = URL.createObjectURL(blobOf(b64, fmt));
    objectUrls.push(url);
    return url;
  }
  function decoded(url) {
    var img = new Image();
    img.src = url;
    return img.decode().then(function () { return img; });
  }
  function addFinal(b64, fmt, index) {
    var fig = document.createElement("figure");
    var img = document.createElement("img");
    img.className = "final";
    img.alt = "Generated image " + (index + 1);
    img.src = urlOf(b64, fmt);
    var link = document.createElement("a");
    link.href = img.src;
    link.download = "image-" + (index + 1) + "." + (fmt === "jpeg" ? "jpg" : fmt || "png");
    link.textContent = "Download image " + (index + 1);
    var cap = document.createElement("figcaption");
    cap.appendChild(link);
    fig.appendChild(img); fig.appendChild(cap);
    results.appendChild(fig);
  }
  function settleCost(rid, tries) {
    fetch("/console/api/requests/" + encodeURIComponent(rid), { headers: { accept: "application/json" } })
      .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
      .then(function (body) { costOut.textContent = body.cost; costOut.setAttribute("data-settled", "1"); })
      .catch(function () { if (tries > 0) setTimeout(function () { settleCost(rid, tries - 1); }, 250); });
  }
  function body() {
    var m = byName[model.value];
    var fields = { model: m.name, prompt: $("p-prompt").value, n: Number(n.value || 1), quality: quality.value };
    fields.size = size.value === "custom" ? sizeFree.value.trim() : size.value;
    if (m.output_formats.length) fields.output_format = format.value;
    if (m.background) fields.background = background.value;
    if (m.moderation) fields.moderation = moderation.value;
    if (m.stream && stream.checked) {
      fields.stream = true;
      fields.partial_images = Number(partials.value || 0);
    } else {
      fields.response_format = "b64_json";
    }
    return fields;
  }
  function readStream(response, fmt) {
    var reader = response.body.getReader(), decoder = new TextDecoder(), buffer = "", finals = 0, failed = false;
    var chain = Promise.resolve(), sizes = [];
    function handle(block) {
      var type = "message", data = "";
      block.split("\n").forEach(function (line) {
        if (line.indexOf("event:") === 0) type = line.slice(6).trim();
        else if (line.indexOf("data:") === 0) data += line.slice(5).trim();
      });
      if (!data) return;
      var event = JSON.parse(data);
      if (event.error) { failed = true; showError(event.error); return; }
      var evFmt = event.output_format || fmt;
      if (/partial_image$/.test(type)) {
        var partialUrl = urlOf(event.b64_json, evFmt);
        // Decoded in order before it is swapped in: each preview replaces the last one, never an
        // older one a newer, and its real pixel size is known.
        chain = chain.then(function () { return decoded(partialUrl); }).then(function (img) {
          previewBox.hidden = false;
          var old = preview.src;
          preview.src = partialUrl;
          if (old && old.indexOf("blob:") === 0) URL.revokeObjectURL(old);
          sizes.push(img.naturalWidth + "x" + img.naturalHeight);
          preview.setAttribute("data-sizes", sizes.join(","));
          count.value = String(sizes.length);
          count.textContent = count.value;
          statusLine.textContent = "Partial preview " + count.value + " received…";
        });
      } else if (/completed$/.test(type)) {
        var b64 = event.b64_json;
        chain = chain.then(function () {
          addFinal(b64, evFmt, finals++);
          previewBox.hidden = true;
          statusLine.textContent = "Done: " + finals + " image(s).";
        });
      }
    }
    function pump() {
      return reader.read().then(function (chunk) {
        if (chunk.done) return chain.then(function () { return { finals: finals, failed: failed }; });
        buffer += decoder.decode(chunk.value, { stream: true }).replace(/\r\n/g, "\n");
        var cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          handle(buffer.slice(0, cut));
          buffer = buffer.slice(cut + 2);
        }
        return pump();
      });
    }
    return pump();
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    clearErrors();
    objectUrls.forEach(function (u) { URL.revokeObjectURL(u); });
    objectUrls = [];
    results.innerHTML = "";
    preview.removeAttribute("src");
    previewBox.hidden = true;
    count.value = "0"; count.textContent = "0";
    costOut.textContent = "—"; costOut.removeAttribute("data-settled");
    ridOut.textContent = "—";
    var fields = body(), edit = mode() === "edit";
    var acting = form.getAttribute("data-acting-as");
    var url = "/console/playground/" + (edit ? "edits" : "generations") + (acting ? "?as=" + encodeURIComponent(acting) : "");
    var init = { method: "POST", headers: { "x-csrf-token": csrf }, credentials: "same-origin" };
    if (edit) {
      var data = new FormData();
      Object.keys(fields).forEach(function (k) { data.append(k, String(fields[k])); });
      Array.prototype.forEach.call($("p-image").files, function (f) { data.append("image[]", f, f.name); });
      if ($("p-mask").files.length) data.append("mask", $("p-mask").files[0], $("p-mask").files[0].name);
      init.body = data;
    } else {
      init.headers["content-type"] = "application/json";
      init.body = JSON.stringify(fields);
    }
    $("p-go").disabled = true;
    statusLine.textContent = "Working…";
    fetch(url, init).then(function (response) {
      var rid = response.headers.get("x-request-id");
      if (rid) ridOut.textContent = rid;
      var type = response.headers.get("content-type") || "";
      if (!response.ok) {
        return response.json().then(function (b) { showError(b.error); }, function () { showError(null); });
      }
      if (type.indexOf("text/event-stream") === 0) {
        return readStream(response, fields.output_format).then(function (outcome) {
          if (rid) settleCost(rid, 20);
          if (!outcome.failed && !outcome.finals) statusLine.textContent = "The stream ended without an image.";
        });
      }
      return response.json().then(function (b) {
        (b.data || []).forEach(function (item, i) { addFinal(item.b64_json, b.output_format || fields.output_format, i); });
        costOut.textContent = response.headers.get("x-gateway-cost") || "—";
        costOut.setAttribute("data-settled", "1");
        statusLine.textContent = "Done: " + (b.data || []).length + " image(s).";
      });
    }).catch(function () { showError({ message: "The gateway could not be reached." }); })
      .then(function () { $("p-go").disabled = false; });
  });
})();
