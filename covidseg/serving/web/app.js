// The page's only script: upload an X-ray to /api/predict and show the answer. Text from the
// server (file names, messages) is set with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const png = (base64) => `data:image/png;base64,${base64}`;

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function loadModel() {
  try {
    const card = await (await fetch("/api/model")).json();
    const dice = card.metrics && card.metrics.dice;
    const networks = card.networks.map((n) => n.name).join(" + ");
    $("model").textContent = `Model ${card.id} · ${networks}` + (dice ? ` · Val Dice ${dice}` : "");
  } catch (error) {
    $("model").textContent = "The model's data could not be loaded.";
  }
}

function stem(name) {
  const base = name.split(/[\\/]/).pop() || "image";
  return base.replace(/\.[^.]*$/, "") || "image";
}

function show(answer) {
  $("xray").src = png(answer.layers.image);
  $("infection-layer").src = png(answer.layers.infection);
  const lungs = answer.layers.lungs;
  $("lung-toggle").hidden = !lungs;
  $("lung-layer").hidden = !lungs || !$("show-lungs").checked;
  if (lungs) $("lung-layer").src = png(lungs);
  const zones = answer.layers.zones;
  $("zone-toggle").hidden = !zones;
  $("zone-layer").hidden = !zones || !$("show-zones").checked;
  if (zones) $("zone-layer").src = png(zones);
  $("file-name").textContent = answer.file;
  $("infected-percent").textContent = String(answer.infected_percent);
  $("infected-pixels").textContent = answer.infected_pixels.toLocaleString("en");
  const hasPresence = answer.presence_probability !== undefined;
  $("presence-label").hidden = $("presence").hidden = !hasPresence;
  if (hasPresence) {
    const gate = answer.presence_threshold;
    $("presence").textContent = answer.presence_probability.toFixed(3) +
      (gate === null ? "" : answer.presence_probability < gate ? ` (below ${gate}: mask emptied)` : ` (gate ${gate})`);
  }
  const checked = answer.xray_threshold !== undefined && answer.xray_threshold !== null;
  $("xray-check-label").hidden = $("xray-check").hidden = !checked;
  if (checked) {
    $("xray-check").textContent = `score ${answer.xray_score.toFixed(1)}, like the model's X-rays (refused above ${answer.xray_threshold.toFixed(1)})`;
  }
  $("image-size").textContent = `${answer.width} × ${answer.height} ${answer.format}`;
  $("seconds").textContent = `${answer.seconds.toFixed(2)} s on the server`;
  const severity = answer.severity;
  $("severity").hidden = !severity;
  if (severity) {
    for (const side of ["right", "left"]) {
      const percent = severity[`${side}_lung_infected_percent`];
      $(`${side}-percent`).textContent = `${percent.toFixed(1)} %`;
      $(`${side}-bar`).style.width = `${Math.min(100, Math.max(0, percent))}%`;
      for (const zone of ["upper", "middle", "lower"]) {
        $(`${side}-${zone}`).textContent = severity[`${side}_${zone}_zone`] ? "involved" : "—";
      }
    }
    $("zone-score").textContent = String(severity.zone_score);
    $("lung-percent").textContent = severity.lung_infected_percent.toFixed(1);
  }
  $("download-mask").href = png(answer.mask_png);
  $("download-mask").download = `${stem(answer.file)}.mask.png`;
  $("download-overlay").href = png(answer.overlay_png);
  $("download-overlay").download = `${stem(answer.file)}.overlay.png`;
  $("result").hidden = false;
}

async function upload(file) {
  if (!file) return;
  setStatus(`Segmenting ${file.name}…`);
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const response = await fetch("/api/predict?layers=true", { method: "POST", body: form });
    const answer = await response.json();
    if (!response.ok) {
      $("result").hidden = true; // never leave an earlier picture's answer under a new error
      const text = answer.error || `The server answered ${response.status}.`;
      setStatus(answer.refused ? `Not segmented — ${text}` : text, true);
      return;
    }
    show(answer);
    setStatus("");
  } catch (error) {
    setStatus("The server could not be reached.", true);
  }
}

function applyOpacity() {
  $("infection-layer").style.opacity = String($("opacity").value / 100);
  $("infection-layer").hidden = !$("show-infection").checked;
}

window.addEventListener("DOMContentLoaded", () => {
  loadModel();
  applyOpacity();
  $("file").addEventListener("change", (event) => upload(event.target.files[0]));
  $("opacity").addEventListener("input", applyOpacity);
  $("show-infection").addEventListener("change", applyOpacity);
  $("show-lungs").addEventListener("change", () => { $("lung-layer").hidden = !$("show-lungs").checked; });
  $("show-zones").addEventListener("change", () => { $("zone-layer").hidden = !$("show-zones").checked; });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    upload(event.dataTransfer.files[0]);
  });
  drop.addEventListener("keydown", (event) => { if (event.key === "Enter" || event.key === " ") $("file").click(); });
});
