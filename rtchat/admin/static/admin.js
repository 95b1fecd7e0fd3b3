// rtchat admin page: the one render path.
//
// The server sends the page's shell and the current status snapshot as JSON
// (<script id="initial-status" type="application/json">); this script draws
// everything from it, then from each snapshot on /admin/api/events (polling
// /admin/api/status while that stream is down). A new column is one edit here.
// Every value reaches the DOM through textContent or setAttribute: never HTML.
(function () {
  "use strict";
  var SVG = "http://www.w3.org/2000/svg";
  var POLL_MS = 2000;
  var DASH = "\u2014";
  var $ = function (id) { return document.getElementById(id); };
  var last = null;  // the latest snapshot, so the client filter can redraw without waiting

  // --- formatting ---------------------------------------------------------------------------
  function dash(v) { return v === null || v === undefined || v === "" ? DASH : String(v); }
  function pad(n) { return n < 10 ? "0" + n : String(n); }
  function clock(ts) {
    if (!ts) { return DASH; }
    var d = new Date(ts * 1000);
    return pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
  }
  // A full local date and time: a failover last Tuesday must not read as one today.
  function dateTime(ts) {
    if (!ts) { return DASH; }
    var d = new Date(ts * 1000);
    return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " + clock(ts);
  }
  function duration(s) {
    s = Math.max(0, Math.floor(s || 0));
    var d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
    if (d) { return d + "d " + h + "h"; }
    if (h) { return h + "h " + m + "m"; }
    if (m) { return m + "m " + (s % 60) + "s"; }
    return (s % 60) + "s";
  }
  function ago(s) { return s === null || s === undefined ? DASH : (s < 1 ? "just now" : duration(s) + " ago"); }
  function ms(v) { return v === null || v === undefined ? DASH : Number(v).toFixed(1) + " ms"; }
  function yesNo(v) { return v === true ? "yes" : v === false ? "no" : "not checked"; }
  function role(ep) {
    var r = ep.configured_role || "?";
    return ep.role && ep.role !== r && !(r === "replica" && ep.role === "slave") ? r + " (now " + ep.role + ")" : r;
  }
  // A server that cannot be reached has no current link or lag: do not show the last ones seen.
  function link(ep) { return ep.reachable === false ? "unknown" : dash(ep.master_link_status); }
  function lag(ep) {
    if (ep.reachable === false || (ep.lag_bytes === null && ep.lag_seconds === null)) { return DASH; }
    return dash(ep.lag_bytes) + " B \u00b7 " + (ep.lag_seconds === null ? DASH : Number(ep.lag_seconds).toFixed(2) + " s");
  }
  function rate(v) { return v === null || v === undefined ? DASH : String(Math.round(v * 100) / 100); }

  // --- DOM helpers ----------------------------------------------------------------------------
  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) { node.className = cls; }
    if (text !== undefined) { node.textContent = text; }
    return node;
  }
  function td(tr, label, text, cls) {
    var cell = el("td", cls, text);
    cell.dataset.label = label;
    tr.appendChild(cell);
    return cell;
  }
  // A cell holding a URL: the URL in its own nowrap span (never broken mid-port), then any mark.
  function urlCell(tr, label, url, mark) {
    var cell = td(tr, label, "", "mono url");
    cell.appendChild(el("span", "url", dash(url)));
    if (mark) { cell.appendChild(el("span", "mark", " " + mark)); }
    return cell;
  }
  function fill(tbody, rows, build) {
    var frag = document.createDocumentFragment();
    rows.forEach(function (row) { var tr = document.createElement("tr"); build(tr, row); frag.appendChild(tr); });
    tbody.replaceChildren(frag);
  }
  function show(node, visible) { node.hidden = !visible; }
  function setClass(node, cls, text) { node.className = cls; node.textContent = text; }
  function svg(tag, attrs) {
    var node = document.createElementNS(SVG, tag);
    Object.keys(attrs).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    return node;
  }

  // --- sections -------------------------------------------------------------------------------
  var VERDICT_CLASS = {healthy: "ok", degraded: "warn", down: "bad"};

  function renderVerdict(s) {
    var v = s.verdict || {state: "healthy", reasons: []};
    setClass($("verdict"), "badge " + (VERDICT_CLASS[v.state] || "warn"), "cluster " + v.state);
    $("verdict").dataset.state = v.state;
    $("verdict-section").className = v.state;
    $("verdict-section").dataset.state = v.state;
    $("verdict-state").textContent = v.state;
    $("verdict-reasons").replaceChildren.apply($("verdict-reasons"), v.reasons.map(function (reason) {
      return el("li", "", reason);
    }));
    var note = $("verdict-note");
    if (s.redis.embedded) {
      note.textContent = "Embedded broker: one node, nothing between nodes to go wrong.";
    } else {
      note.textContent = "Judged from every live node's heartbeat: the same on every node.";
    }
    show(note, true);
  }

  function renderNode(s) {
    var n = s.node;
    $("hdr-node").textContent = n.id;
    $("node-id").textContent = n.id;
    $("node-version").textContent = n.version;
    $("node-uptime").textContent = duration(n.uptime_seconds);
    $("node-pid").textContent = n.pid;
    $("node-clients").textContent = n.clients;
    $("node-in").textContent = n.in_per_second;
    $("node-out").textContent = n.out_per_second;
    $("node-broker").textContent = s.redis.embedded ? "embedded" : n.broker;
    renderSparkline(n.sparkline);
    var ready = s.ready.ready;
    setClass($("ready"), "badge " + (ready ? "ok" : "bad"), ready ? "ready" : "not ready");
    $("reasons").textContent = "Not ready: " + s.ready.reasons.join("; ");
    show($("reasons"), !ready);
  }

  function renderSparkline(sp) {
    var root = $("spark");
    root.setAttribute("viewBox", "0 0 " + sp.width + " " + sp.height);
    var frag = document.createDocumentFragment();
    (sp.scale || []).forEach(function (tick) {
      frag.appendChild(svg("line", {"class": "grid", x1: 0, x2: sp.width, y1: tick.y, y2: tick.y}));
    });
    frag.appendChild(svg("polyline", {id: "spark-in", "class": "in", points: sp["in"]}));
    frag.appendChild(svg("polyline", {id: "spark-out", "class": "out", points: sp.out}));
    root.replaceChildren(frag);
    $("spark-axis").replaceChildren.apply($("spark-axis"), (sp.scale || []).map(function (tick) {
      return el("span", "tick", rate(tick.value));
    }));
    $("spark-peak").textContent = rate(sp.peak);
    $("spark-max").textContent = rate(sp.max);
    $("spark-span").textContent = "\u2212" + duration(sp.span_seconds);
  }

  function renderCluster(s) {
    var nodes = s.cluster.nodes, missing = s.cluster.missing || [];
    $("cluster-count").textContent = nodes.length + (nodes.length === 1 ? " node" : " nodes") +
      (missing.length ? " \u00b7 " + missing.length + " missing" : "");
    var rows = nodes.concat(missing);
    fill($("cluster-rows"), rows, function (tr, n) {
      if (n.self) { tr.className = "self"; }
      if (n.missing) { tr.className = "missing"; }
      td(tr, "node", dash(n.id) + (n.self ? " (this node)" : "") + (n.missing ? " (missing)" : ""), "mono");
      td(tr, "address", dash(n.address), "mono nowrap");
      td(tr, "clients", dash(n.clients));
      td(tr, "rooms", dash(n.rooms));
      var seen = n.seen_seconds_ago;
      if (n.missing && n.last_seen) { seen = Math.max(0, s.generated_at - n.last_seen); }
      td(tr, "last seen", n.missing ? dateTime(n.last_seen) + " (" + ago(seen) + ")" : ago(seen), "nowrap");
      urlCell(tr, "reads from", n.endpoint);
    });
    $("cluster-error").textContent = "Cluster view unavailable: " + dash(s.cluster.error);
    show($("cluster-error"), !!s.cluster.error);
  }

  function renderRooms(s) {
    var rooms = s.rooms || {count: 0, listed: []};
    $("rooms-count").textContent = rooms.count + (rooms.count === 1 ? " room" : " rooms");
    fill($("room-rows"), rooms.listed, function (tr, r) {
      tr.dataset.room = r.room;
      td(tr, "room", r.room, "mono");
      td(tr, "clients", String(r.clients));
      td(tr, "msgs / min", String(r.per_minute));
      td(tr, "on nodes", String(r.nodes));
    });
    show($("rooms-empty"), rooms.listed.length === 0);
  }

  function renderTopology(t) {
    var root = $("topology");
    root.setAttribute("viewBox", "0 0 " + t.width + " " + t.height);
    root.setAttribute("width", t.width);
    root.setAttribute("height", t.height);
    root.style.minWidth = "min(" + t.width + "px, 30rem)";
    var frag = document.createDocumentFragment();
    t.links.forEach(function (l) { frag.appendChild(svg("path", {"class": l.kind + " " + l.state, d: l.d})); });
    t.boxes.forEach(function (b) {
      var g = svg("g", {"class": "box " + b.kind + " " + b.state + (b.self ? " self" : "")});
      var title = svg("title", {});
      title.textContent = b.title;
      var label = svg("text", {"class": "label", x: b.x + 10, y: b.y + 19});
      label.textContent = b.label;
      var detail = svg("text", {"class": "detail", x: b.x + 10, y: b.y + 36});
      detail.textContent = b.detail;
      g.append(title, svg("rect", {x: b.x, y: b.y, width: b.w, height: b.h, rx: 6}), label, detail);
      frag.appendChild(g);
    });
    root.replaceChildren(frag);
  }

  function renderRedis(s) {
    var r = s.redis;
    show($("redis-embedded"), r.embedded);
    show($("redis-details"), !r.embedded);
    if (r.embedded) { return; }
    fill($("endpoint-rows"), r.endpoints, function (tr, ep) {
      urlCell(tr, "endpoint", ep.url, ep.subscribed ? "\u2605" : "");
      var up = ep.reachable !== false && ep.master_link_status === "up";
      td(tr, "role", role(ep), "nowrap");
      td(tr, "reachable", yesNo(ep.reachable), "nowrap " +
         (ep.reachable === true ? "ok-text" : ep.reachable === false ? "bad-text" : "warn-text"));
      td(tr, "link", link(ep), "nowrap " + (up ? "ok-text" : ep.master_link_status ? "bad-text" : ""));
      td(tr, "lag", lag(ep), "nowrap");
      td(tr, "ping", ms(ep.ping_ms), "nowrap");
      td(tr, "probe", ms(ep.probe_ms), "nowrap");
      td(tr, "health", ep.healthy ? "healthy" : "unhealthy" + (ep.problem ? ": " + ep.problem : ""),
         ep.healthy ? "nowrap ok-text" : "bad-text");
      var since = td(tr, "down since", ep.down_since ? "" : DASH);
      if (ep.down_since) {  // the date, then how long ago: two unbreakable parts
        since.append(el("span", "nowrap", dateTime(ep.down_since)), " ",
                     el("span", "nowrap", "(" + ago(s.generated_at - ep.down_since) + ")"));
      }
      td(tr, "last error", dash(ep.last_error), "small err");
    });
    $("subscribed").textContent = r.subscribed_endpoint || "none";
    var shards = r.shards || [];  // Redis Cluster mode: one row a shard
    show($("shards"), shards.length > 0);
    $("shards-count").textContent = shards.length ? shards.length + " shards" : "";
    fill($("shard-rows"), shards, function (tr, sh) {
      td(tr, "slots", sh.slots.map(function (r) { return r[0] === r[1] ? r[0] : r[0] + "\u2013" + r[1]; })
         .join(", "), "mono nowrap");
      urlCell(tr, "master", sh.master);
      td(tr, "replicas", sh.replicas.length ? sh.replicas.join(" ") : DASH, "mono small");
      td(tr, "health", sh.healthy ? "healthy" : "unhealthy", sh.healthy ? "nowrap ok-text" : "nowrap bad-text");
      urlCell(tr, "this node reads", sh.reading, sh.reading ? "\u2605" : "");
      td(tr, "rooms here", String(sh.rooms), "nowrap");
    });
    var history = (r.cluster_failovers || []).slice().reverse();
    $("failover-count").textContent = history.length + " listed \u00b7 this node switched " +
      r.failover_count + (r.failover_count === 1 ? " time" : " times");
    fill($("failover-rows"), history, function (tr, f) {
      td(tr, "when", dateTime(f.at), "nowrap");
      td(tr, "node", dash(f.node), "mono nowrap");
      urlCell(tr, "from", f.from);
      urlCell(tr, "to", f.to);
      td(tr, "why", dash(f.reason));
      td(tr, "recovered", dash(f.recovered));
    });
    show($("failover-empty"), history.length === 0);
  }

  // The client filter: every word must match the room, the nick or the address (or the id).
  function matches(c, words) {
    var hay = [c.room, c.nick || "", c.remote, c.id].join(" ").toLowerCase();
    return words.every(function (w) { return hay.indexOf(w) !== -1; });
  }

  // Client rows are keyed by id and updated in place, so a button is never pulled from under a click.
  function renderClients(s) {
    var tbody = $("client-rows");
    var words = $("client-filter").value.toLowerCase().split(/\s+/).filter(Boolean);
    var listed = s.clients.listed.filter(function (c) { return matches(c, words); });
    var rows = {};
    Array.prototype.forEach.call(tbody.rows, function (tr) { rows[tr.dataset.id] = tr; });
    var keep = {};
    listed.forEach(function (c, i) {
      keep[c.id] = true;
      var tr = rows[c.id];
      if (!tr) {
        tr = document.createElement("tr");
        tr.dataset.id = c.id;
        ["id", "room", "nick", "remote", "user agent", "connected", "last event id", "queue", ""].forEach(
          function (label) { td(tr, label, ""); });
        var button = el("button", "kick", "Disconnect");
        button.type = "button";
        button.dataset.id = c.id;
        tr.cells[8].appendChild(button);
      }
      var cells = tr.cells;
      cells[0].className = "mono nowrap"; cells[0].textContent = c.id;
      cells[1].textContent = c.room;
      cells[2].textContent = dash(c.nick);
      cells[3].className = "mono nowrap"; cells[3].textContent = c.remote;
      cells[4].className = "ua small"; cells[4].textContent = dash(c.user_agent);
      cells[5].className = "nowrap";
      cells[5].textContent = clock(c.connected_at) + " (" + duration(s.generated_at - c.connected_at) + ")";
      cells[6].className = "mono nowrap"; cells[6].textContent = dash(c.last_event_id);
      cells[7].textContent = c.queue;
      if (tbody.rows[i] !== tr) { tbody.insertBefore(tr, tbody.rows[i] || null); }
    });
    Object.keys(rows).forEach(function (id) { if (!keep[id]) { rows[id].remove(); } });
    $("clients-count").textContent = s.clients.count;
    $("clients-shown").textContent = words.length ? listed.length + " of " + s.clients.listed.length + " shown" : "";
    show($("clients-empty"), s.clients.count === 0);
    $("clients-truncated").textContent = "Showing the " + s.clients.listed.length + " longest-connected clients.";
    show($("clients-truncated"), s.clients.truncated);
  }

  function render(s) {
    last = s;
    renderVerdict(s);
    renderNode(s);
    renderCluster(s);
    renderRooms(s);
    renderTopology(s.topology);
    renderRedis(s);
    renderClients(s);
    $("updated").textContent = clock(s.generated_at);
  }

  $("client-filter").addEventListener("input", function () { if (last) { renderClients(last); } });

  // --- disconnect ------------------------------------------------------------------------------
  $("client-rows").addEventListener("click", function (e) {
    var button = e.target.closest("button.kick");
    if (!button) { return; }
    var id = button.dataset.id;
    button.disabled = true;
    fetch("/admin/api/clients/" + encodeURIComponent(id) + "/disconnect",
          {method: "POST", credentials: "same-origin"}).then(function (r) {
      return r.json().then(function (body) {
        if (r.ok) {
          $("action-msg").textContent = "Disconnected " + id + ".";
          var tr = button.closest("tr");
          if (tr) { tr.classList.add("gone"); }
        } else {
          $("action-msg").textContent = body.message || ("Disconnect failed (" + r.status + ")");
          button.disabled = false;
        }
      });
    }).catch(function () {
      $("action-msg").textContent = "Network error: not disconnected.";
      button.disabled = false;
    });
  });

  // --- live updates: EventSource, polling while it is down -------------------------------------
  var live = $("live");
  var pollTimer = null;
  function mode(name, cls, text) { live.dataset.mode = name; setClass(live, "badge " + cls, text); }
  function poll() {
    fetch("/admin/api/status", {credentials: "same-origin", cache: "no-store"}).then(function (r) {
      if (!r.ok) { throw new Error("status " + r.status); }
      return r.json();
    }).then(function (s) {
      render(s);
      if (pollTimer) { mode("polling", "warn", "polling"); }
    }, function () { mode("offline", "bad", "offline"); });
  }
  function startPolling() {
    if (pollTimer) { return; }
    pollTimer = setInterval(poll, POLL_MS);
    poll();
  }
  function stopPolling() {
    if (pollTimer) { clearInterval(pollTimer); pollTimer = null; }
  }
  function connect() {
    if (!window.EventSource) { startPolling(); return; }
    var source = new EventSource("/admin/api/events");
    source.addEventListener("status", function (e) {
      stopPolling();
      mode("live", "ok", "live");
      render(JSON.parse(e.data));
    });
    source.onerror = function () {
      startPolling();
      if (source.readyState === EventSource.CLOSED) {
        setTimeout(connect, 15000);  // it gave up (e.g. an error answer); try again later
      }
    };
  }

  render(JSON.parse($("initial-status").textContent));
  connect();
})();
