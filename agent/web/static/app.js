// The debug page: refreshes the stats every few seconds without a reload,
// and runs Measure Image Pull. Text goes in with textContent only: tags and
// image names come from outside the agent.
"use strict";

const REFRESH_MS = 3000;

function $(id) { return document.getElementById(id); }

function setText(id, v) { $(id).textContent = v; }

function formatBytes(n) {
  if (n < 1000) return n + " B";
  const units = "kMGTP";
  let i = -1;
  do { n /= 1000; i++; } while (n >= 1000 && i < units.length - 1);
  return n.toFixed(1) + " " + units[i] + "B";
}

function row(cells, cls) {
  const tr = document.createElement("tr");
  if (cls) tr.className = cls;
  for (const c of cells) {
    const td = document.createElement("td");
    if (c && typeof c === "object") {
      td.textContent = c.text;
      if (c.cls) td.className = c.cls;
      if (c.colspan) td.colSpan = c.colspan;
    } else {
      td.textContent = c;
    }
    tr.appendChild(td);
  }
  return tr;
}

function renderStats(s) {
  setText("version", s.version);
  setText("updated", new Date(s.now).toISOString().substring(11, 19));
  setText("last-mirror-success", s.lastMirrorSuccess);
  setText("last-mirror-success-hint", s.lastMirrorSuccessAt ? "ago" : "no request served from a peer yet");
  setText("peer-count", s.peers.length);
  setText("peer-hit-ratio", s.requests.peerHitRatio < 0 ? "-" : Math.round(s.requests.peerHitRatio * 100) + "%");
  setText("bytes-from-peers", formatBytes(s.bytes.fromPeers));
  setText("req-local", s.requests.local);
  setText("req-peer", s.requests.peer);
  setText("req-miss", s.requests.miss);
  setText("req-failures", s.requests.peerFailures);
  setText("bytes-peer", formatBytes(s.bytes.fromPeers));
  setText("bytes-saved", formatBytes(s.bytes.upstreamSaved));
  setText("bytes-local", formatBytes(s.bytes.fromLocal));
  setText("bytes-to-peers", formatBytes(s.bytes.servedToPeers));

  const peers = $("peers");
  peers.replaceChildren();
  for (const p of s.peers) peers.appendChild(row([p.address || "(no address)", { text: p.id, cls: "id" }]));
  if (s.peers.length === 0) {
    peers.appendChild(row([{ text: "No peers connected: this node serves only what it holds itself.", colspan: 2 }], "empty"));
  }

  setText("adv-images", s.advertised.images);
  setText("adv-tags", s.advertised.tags);
  setText("adv-digests", s.advertised.digests);
  const tags = $("adv-tag-list");
  tags.replaceChildren();
  for (const t of s.advertised.tagKeys) {
    const li = document.createElement("li");
    li.textContent = t;
    tags.appendChild(li);
  }
  if (s.advertised.tagKeys.length === 0) {
    const li = document.createElement("li");
    li.className = "empty";
    li.textContent = "No tags yet.";
    tags.appendChild(li);
  }
  setText("adv-more", s.advertised.more ? "and " + s.advertised.more + " more" : "");

  const canary = $("canary");
  canary.className = s.canary.state === "ok" ? "good" : s.canary.state === "failed" ? "bad" : "muted";
  canary.textContent = (s.canary.state === "ok" ? "PROVEN: " : s.canary.state === "failed" ? "BROKEN: " : "") + s.canary.detail;
  const prep = $("prep");
  prep.className = !s.prep.configured ? "muted" : s.prep.ok ? "good" : "bad";
  prep.textContent = (s.prep.configured ? (s.prep.ok ? "OK: " : "FAILED: ") : "") + s.prep.detail;
  setText("refresh-error", s.error || "");
}

async function refresh() {
  try {
    const resp = await fetch("stats", { cache: "no-store" });
    if (!resp.ok) throw new Error("stats: HTTP " + resp.status);
    renderStats(await resp.json());
  } catch (e) {
    setText("refresh-error", "· refresh failed: " + e.message);
  }
}

function renderMeasurement(m) {
  const l = m.lookup;
  setText("lookup-key", l.key);
  setText("lookup-local", l.local ? "yes" : "no");
  setText("lookup-peers", l.peers.length ? l.peers.join(", ") : (l.error ? "lookup failed: " + l.error : "none found in " + l.duration));
  setText("lookup-latency", l.latency || "-");

  const p = m.pull;
  setText("pull-image", m.image + (p.digest ? " (" + p.digest + ", " + p.platform + ")" : ""));
  setText("pull-duration", p.duration);
  setText("pull-size", p.sizeText);
  setText("pull-throughput", p.throughput);
  setText("pull-error", p.error ? "Pull stopped: " + p.error : "");
  const body = $("pull-blobs");
  body.replaceChildren();
  for (const b of p.blobs) {
    const src = b.source + (b.peers.length ? " " + b.peers.join(", ") : "");
    const tr = row([b.kind, { text: b.digest, cls: "id" }, { text: b.sizeText, cls: "num" },
      { text: b.duration, cls: "num" }, { text: b.throughput, cls: "num" }, { text: src, cls: "src-" + b.source }]);
    tr.dataset.kind = b.kind;
    body.appendChild(tr);
  }
  $("measure-result").hidden = false;
}

async function measure(ev) {
  ev.preventDefault();
  const image = $("measure-image").value.trim();
  const button = $("measure-pull");
  button.disabled = true;
  setText("measure-status", "Pulling " + image + " ...");
  try {
    const resp = await fetch("measure", { method: "POST", body: new URLSearchParams({ image }) });
    const body = await resp.json();
    if (!resp.ok) throw new Error(body.error || "HTTP " + resp.status);
    renderMeasurement(body);
    setText("measure-status", measureStatus(body));
  } catch (e) {
    setText("measure-status", "Measure failed: " + e.message);
  } finally {
    button.disabled = false;
  }
}

function measureStatus(m) {
  return m.pull.error ? "Done, with an error." : "Done: " + m.pull.blobs.length + " requests in " + m.pull.duration + ".";
}

document.addEventListener("DOMContentLoaded", () => {
  $("measure-form").addEventListener("submit", measure);
  setInterval(refresh, REFRESH_MS);
});
