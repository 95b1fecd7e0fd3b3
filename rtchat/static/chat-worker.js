/* rtchat: the one event stream a browser holds for all of its chat tabs.
 *
 * Loaded two ways. As a SharedWorker (new SharedWorker("/static/chat-worker.js")),
 * it owns one EventSource on /events?rooms=<every room any tab wants> and fans its
 * events out to every tab's port. As a plain script in a page, it defines
 * window.RtchatStreams, the same logic, for the tab that holds the stream when
 * SharedWorker is missing (BroadcastChannel + Web Locks leader election) or for a
 * tab on its own (the last fallback).
 *
 * Tabs send {t: "hello", tab, rooms, nick, fresh}, {t: "bye", tab}. The stream sends:
 *   {t: "state", state, rooms, epoch, cursor}   connecting | connected | reconnecting | kicked | idle
 *   {t: "message", msg, cursor}                  msg names its room
 *   {t: "presence", room, count}
 *   {t: "reset", room}                           that room's history has a gap
 *   {t: "kicked", reason}                        the stream was ended by an admin: no reconnect
 * "cursor" is the stream's resume id for the whole room set: a tab that takes the stream
 * over (the leader closed) opens it from the last cursor it saw, so nothing is lost.
 */
(function (scope) {
  "use strict";

  var MAX_ROOMS = 32;
  var SETTLE_MS = 30;  // changes of the room set within this long are one reopen

  function RtchatStreams(post, cursor) {
    this.post = post;          // post(message): to every tab
    this.tabs = {};            // tab id -> {rooms, nick}
    this.cursor = cursor || "";
    this.source = null;
    this.rooms = [];
    this.nick = "";
    this.state = "idle";
    this.kicked = null;
    this.presence = {};
    this.epoch = 0;            // +1 per stream opened: tabs refetch the shown room's history
    this.id = Math.random().toString(36).slice(2);
    this.timer = null;
    this.failures = 0;
  }

  RtchatStreams.prototype.snapshot = function () {
    return {t: "state", state: this.state, rooms: this.rooms.slice(), epoch: this.id + ":" + this.epoch,
            cursor: this.cursor, kicked: this.kicked, presence: this.presence};
  };

  RtchatStreams.prototype.setState = function (state) {
    this.state = state;
    this.post(this.snapshot());
  };

  // fresh: the tab was just loaded. After a kick, that is the person coming back on
  // purpose (the page says "reload to come back"), so the stream opens again.
  RtchatStreams.prototype.hello = function (tab, rooms, nick, fresh) {
    this.tabs[tab] = {rooms: (rooms || []).slice(), nick: nick || ""};
    if (fresh && this.kicked !== null) {
      this.kicked = null;
      this.rooms = [];  // so that plan() opens it
      this.state = "connecting";
    }
    this.post(this.snapshot());
    this.plan();
  };

  RtchatStreams.prototype.bye = function (tab) {
    delete this.tabs[tab];
    this.plan();
  };

  // Every room some tab wants, in a stable order; the nick of the tab that spoke last.
  RtchatStreams.prototype.wanted = function () {
    var set = {}, nick = "";
    for (var id in this.tabs) {
      if (!Object.prototype.hasOwnProperty.call(this.tabs, id)) { continue; }
      this.tabs[id].rooms.forEach(function (r) { set[r] = true; });
      nick = this.tabs[id].nick || nick;
    }
    return {rooms: Object.keys(set).sort().slice(0, MAX_ROOMS), nick: nick};
  };

  RtchatStreams.prototype.plan = function () {
    var self = this;
    if (this.timer !== null) { clearTimeout(this.timer); }
    this.timer = setTimeout(function () {
      self.timer = null;
      var want = self.wanted();
      var same = want.rooms.join(",") === self.rooms.join(",") && want.nick === self.nick;
      if (!same || (!self.source && want.rooms.length)) { self.open(want.rooms, want.nick); }
    }, SETTLE_MS);
  };

  RtchatStreams.prototype.close = function () {
    if (this.source) { this.source.close(); this.source = null; }
  };

  // (Re)open the stream on these rooms, resuming from the cursor: the rooms it names
  // resume exactly, a room new to the set starts live (its tabs refetch its history).
  RtchatStreams.prototype.open = function (rooms, nick) {
    var self = this;
    this.close();
    this.rooms = rooms;
    this.nick = nick;
    if (this.kicked !== null) { return; }  // kicked: no stream until the page is loaded again
    if (!rooms.length) { this.setState("idle"); return; }
    var params = new URLSearchParams();
    params.set("rooms", rooms.join(","));
    if (this.cursor) { params.set("last_event_id", this.cursor); }
    if (nick) { params.set("nick", nick); }
    var source = new EventSource("/events?" + params.toString().replace(/%2C/g, ","));
    this.source = source;
    if (this.state !== "reconnecting") { this.setState("connecting"); }
    source.onopen = function () {
      if (self.source !== source) { return; }
      self.failures = 0;
      self.epoch += 1;
      self.setState("connected");
    };
    source.onerror = function () {
      if (self.source !== source) { return; }
      self.setState("reconnecting");
      // EventSource retries a dropped stream by itself (with the last id), but gives up on a
      // refusal (a non-200 answer): then try again, later each time, from the cursor.
      if (source.readyState === EventSource.CLOSED) {
        self.source = null;
        self.failures += 1;
        var delay = Math.min(30000, 1000 * Math.pow(2, self.failures - 1)) * (0.5 + Math.random());
        setTimeout(function () {
          if (!self.source && self.kicked === null) { self.open(self.rooms, self.nick); }
        }, delay);
      }
    };
    source.addEventListener("message", function (e) {
      if (self.source !== source) { return; }
      self.cursor = e.lastEventId || self.cursor;
      var msg;
      try { msg = JSON.parse(e.data); } catch (err) { return; }
      self.post({t: "message", msg: msg, cursor: self.cursor});
    });
    source.addEventListener("presence", function (e) {
      if (self.source !== source) { return; }
      var p = JSON.parse(e.data);
      if (p.room) { self.presence[p.room] = p.count; }
      self.post({t: "presence", room: p.room, count: p.count});
    });
    source.addEventListener("reset", function (e) {
      if (self.source !== source) { return; }
      var r = {};
      try { r = JSON.parse(e.data); } catch (err) { /* a reset without a body */ }
      self.post({t: "reset", room: r.room || ""});
    });
    source.addEventListener("kicked", function (e) {
      if (self.source !== source) { return; }
      var reason = "";
      try { reason = JSON.parse(e.data).reason || ""; } catch (err) { /* no reason given */ }
      self.kicked = reason;
      self.close();  // never back by itself: an admin ended this stream
      self.post({t: "kicked", reason: reason});
      self.setState("kicked");
    });
  };

  RtchatStreams.prototype.handle = function (m) {
    if (!m || typeof m !== "object") { return; }
    if (m.t === "hello") { this.hello(m.tab, m.rooms, m.nick, m.fresh); }
    else if (m.t === "bye") { this.bye(m.tab); }
  };

  var isSharedWorker = typeof SharedWorkerGlobalScope !== "undefined" &&
    scope instanceof SharedWorkerGlobalScope;  // eslint-disable-line no-undef

  if (isSharedWorker) {
    var ports = [];
    var streams = new RtchatStreams(function (m) {
      ports.forEach(function (p) { p.postMessage(m); });
    });
    scope.onconnect = function (e) {
      var port = e.ports[0];
      ports.push(port);
      port.onmessage = function (ev) {
        if (ev.data && ev.data.t === "bye") {
          var i = ports.indexOf(port);
          if (i >= 0) { ports.splice(i, 1); }
        }
        streams.handle(ev.data);
      };
      port.start();
    };
  } else {
    scope.RtchatStreams = RtchatStreams;
  }
})(self);
