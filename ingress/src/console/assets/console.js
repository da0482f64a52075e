// wagate console: small progressive enhancements. Every page works without this script; it adds
// live updates, copy buttons, confirmations and the backend fields of the agent form. Text from
// the server is only ever put into the page with textContent, never as HTML.
"use strict";

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

// Agent form: show only the fields of the chosen backend.
function backendFields() {
  const form = document.querySelector("[data-backend-form]");
  if (!form) return;
  const select = form.querySelector("#backend");
  const update = () => {
    form.querySelectorAll("fieldset[data-backend]").forEach((f) => {
      f.hidden = f.dataset.backend !== select.value;
    });
  };
  select.addEventListener("change", update);
  update();
}

// Copy buttons next to URLs.
function copyButtons() {
  document.querySelectorAll("[data-copy]").forEach((button) => {
    button.addEventListener("click", async () => {
      const target = document.getElementById(button.dataset.copy);
      if (!target) return;
      try {
        await navigator.clipboard.writeText(target.textContent);
        button.textContent = "Copied";
      } catch (_) {
        window.getSelection().selectAllChildren(target);
      }
    });
  });
}

// Forms that ask before they act (Replay all).
function confirmations() {
  document.querySelectorAll("form[data-confirm]").forEach((form) => {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  });
}

function chatLine(list, mine, text, at, who) {
  const li = el("li", mine ? "mine" : "theirs");
  if (who) {
    li.append(el("span", "who", who), " ");
  }
  li.append(el("span", "text", text), " ", el("time", "", at));
  list.append(li);
  li.scrollIntoView({ block: "nearest" });
}

// Test chat: send without a reload, and poll the simulated outbox for replies.
function testChat() {
  const list = document.getElementById("chat-log");
  const form = document.querySelector("[data-chat-form]");
  if (!list || !form) return;
  let after = Number(list.dataset.after) || 0;
  const input = form.querySelector("#message");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = input.value;
    if (!text.trim()) return;
    const body = new URLSearchParams(new FormData(form));
    const r = await fetch(form.action, {
      method: "POST",
      body,
      headers: { Accept: "application/json" },
      credentials: "same-origin",
    });
    if (r.ok) {
      chatLine(list, true, text, "just now");
      input.value = "";
    } else {
      const e = await r.json().catch(() => ({ error: "could not send" }));
      chatLine(list, true, "Not sent: " + e.error, "");
    }
  });
  const poll = async () => {
    try {
      const r = await fetch(list.dataset.replies + "?after=" + after, { credentials: "same-origin" });
      if (r.ok) {
        const data = await r.json();
        for (const m of data.messages) {
          chatLine(list, false, m.body, m.at);
          after = Math.max(after, m.index);
        }
      }
    } finally {
      setTimeout(poll, 1000);
    }
  };
  setTimeout(poll, 1000);
}

// Conversations: the list, rebuilt from server-sent events.
function liveConversations() {
  const list = document.getElementById("conversations");
  if (!list || !window.EventSource) return;
  const source = new EventSource(list.dataset.events);
  source.addEventListener("conversations", (event) => {
    const rows = JSON.parse(event.data);
    const items = rows.map((r) => {
      const li = el("li");
      const a = el("a", "", r.phone);
      a.href = r.href;
      li.append(a, " ", el("span", "name", r.name || ""));
      if (r.person) li.append(" ", el("span", "badge", "with a person"));
      li.append(" ", el("span", "meta", r.messages + " messages · last " + r.last_seen));
      return li;
    });
    list.replaceChildren(...items);
  });
}

// The delivery of a reply: each Twilio message with its status (and error code), as the
// transcript page renders it.
function deliveryList(parts) {
  const ul = el("ul", "delivery");
  ul.setAttribute("aria-label", "Delivery");
  if (parts.length === 0) ul.append(el("li", "pending", "no delivery on record yet"));
  for (const p of parts) {
    const li = el("li");
    li.append(el("code", "", p.sid), " ", el("span", "status status-" + p.status, p.status));
    if (p.code !== null && p.code !== undefined) {
      const a = el("a", "", "Twilio error " + p.code);
      a.href = "https://www.twilio.com/docs/api/errors/" + encodeURIComponent(p.code);
      a.rel = "noreferrer";
      li.append(" ", a);
    }
    ul.append(li);
  }
  return ul;
}

// A transcript: turns appended from server-sent events as they are stored, and each reply's
// delivery replaced as Twilio reports its messages' statuses.
function liveTranscript() {
  const list = document.getElementById("transcript");
  if (!list || !window.EventSource) return;
  const source = new EventSource(list.dataset.events);
  source.addEventListener("turn", (event) => {
    const t = JSON.parse(event.data);
    chatLine(list, t.user, t.text, t.at, t.who);
    const li = list.lastElementChild;
    li.dataset.index = t.index;
    if (!t.user) li.append(deliveryList(t.parts));
  });
  source.addEventListener("delivery", (event) => {
    const d = JSON.parse(event.data);
    const li = list.querySelector(':scope > li[data-index="' + Number(d.index) + '"]');
    if (!li) return;
    const old = li.querySelector(":scope > ul.delivery");
    if (old) old.replaceWith(deliveryList(d.parts));
    else li.append(deliveryList(d.parts));
  });
}

document.addEventListener("DOMContentLoaded", () => {
  backendFields();
  copyButtons();
  confirmations();
  testChat();
  liveConversations();
  liveTranscript();
});
