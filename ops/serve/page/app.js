// The search page: one query box, the conversation so far (follow-ups send it as history),
// clarifying questions as buttons, fragments with the matched turns highlighted in their context.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = [];

function credentials() {
  const params = new URLSearchParams(location.hash.slice(1));
  for (const name of ["key", "user"]) {
    const input = $(name);
    input.value = input.value || params.get(name) || localStorage.getItem("tessera." + name) || "";
    input.addEventListener("change", () => localStorage.setItem("tessera." + name, input.value));
  }
  if (params.get("key")) history.replaceState(null, "", location.pathname);
}

function headers() {
  return { "Authorization": "Bearer " + $("key").value.trim(), "X-Tessera-User": $("user").value.trim(),
           "Content-Type": "application/json" };
}

async function call(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers() });
  const body = (response.headers.get("content-type") || "").includes("json") ? await response.json() : await response.blob();
  if (!response.ok) throw new Error(body.detail ? `${body.code}: ${body.detail}` : response.statusText);
  return body;
}

function showConversation() {
  $("conversation").replaceChildren(...conversation.map((turn) => {
    const li = document.createElement("li");
    li.dataset.role = turn.role;
    li.textContent = turn.text;
    return li;
  }));
}

async function search(query) {
  $("status").textContent = "searching...";
  $("question").hidden = true;
  const started = performance.now();
  try {
    const result = await call("/v1/search", { method: "POST", body: JSON.stringify({ query, history: conversation, top_k: 5 }) });
    const roundTrip = performance.now() - started;
    conversation.push({ role: "user", text: query });
    if (result.status === "clarify") {
      showQuestion(result.clarifying_question);
    }
    showConversation();
    await showResults(result);
    $("status").textContent = `${result.fragments.length} fragments for "${result.rewritten_query}" in ` +
      `${(result.timings_ms.total || 0).toFixed(1)} ms (round trip ${roundTrip.toFixed(0)} ms), turns chosen by ${result.reasoned_by}`;
  } catch (error) {
    $("status").innerHTML = "";
    const span = document.createElement("span");
    span.className = "problem";
    span.textContent = error.message;
    $("status").append(span);
  }
}

function showQuestion(question) {
  $("question-text").textContent = question.text;
  $("options").replaceChildren(...question.options.map((option) => {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = option;
    button.addEventListener("click", () => {
      conversation.push({ role: "assistant", text: question.text });
      search(option);
    });
    return button;
  }));
  $("question").hidden = false;
}

async function showResults(result) {
  const items = await Promise.all(result.fragments.map(async (fragment, rank) => {
    const li = document.createElement("li");
    li.className = "fragment";
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = `${fragment.conversation_id} · ${new Date(fragment.start_at).toLocaleString()} · score ${fragment.score.toFixed(3)}`;
    li.append(meta);
    const ids = fragment.context_message_ids.map(encodeURIComponent).join(",");
    const { turns } = await call(`/v1/conversations/${encodeURIComponent(fragment.conversation_id)}/turns?ids=${ids}`);
    for (const turn of turns) {
      li.append(await showTurn(fragment, turn));
    }
    return li;
  }));
  $("results").replaceChildren(...items);
}

async function showTurn(fragment, turn) {
  const div = document.createElement("div");
  div.className = "turn" + (fragment.message_ids.includes(turn.message_id) ? " match" : "");
  div.dataset.messageId = turn.message_id;
  const time = document.createElement("time");
  time.textContent = new Date(turn.sent_at).toLocaleString();
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = turn.sender_name || turn.sender_id;
  const text = document.createElement("span");
  text.textContent = turn.text;
  div.append(time, who, text);
  for (const image of turn.images) {
    const path = `/v1/conversations/${encodeURIComponent(fragment.conversation_id)}/messages/` +
      `${encodeURIComponent(turn.message_id)}/images/${image.index}`;
    try {
      const img = document.createElement("img");
      img.src = URL.createObjectURL(await call(path));
      img.alt = image.caption || "image";
      div.append(img);
    } catch (error) {
      const note = document.createElement("em");
      note.textContent = ` [image: ${image.caption || "not shown"}]`;
      div.append(note);
    }
  }
  return div;
}

credentials();
$("ask").addEventListener("submit", (event) => {
  event.preventDefault();
  const query = $("query").value.trim();
  if (query) search(query);
});
$("restart").addEventListener("click", () => {
  conversation.length = 0;
  showConversation();
  $("results").replaceChildren();
  $("question").hidden = true;
  $("status").textContent = "";
  $("query").value = "";
});
