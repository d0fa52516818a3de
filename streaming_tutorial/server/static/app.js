// The classroom page: a chat, a race of parallel streams, and a panel of the server's state.
import { apiKey, failure, getJSON } from "./api.js";
import { setupChat } from "./chat.js";
import { setupPanel } from "./panel.js";
import { setupRace } from "./race.js";

const $ = (id) => document.getElementById(id);
let models = null;  // the served model names, from v1/models (the API's own answer, not /health's)
let loading = false;
let needsKey = false;  // after a 401, wait for the user's key instead of asking again every second
let asked = false;  // the server has asked for a key once: the header's "API key" button stays from then on

const currentModel = () => $("model").value || models?.[0];

// The key form shows what applies: "Forget the key" only when there is one to forget; the header's button only
// once the server has asked for a key, or a key is set (a server without keys never shows either).
function showKeyControls() {
  $("key-forget").hidden = !apiKey.get();
  $("key-toggle").hidden = !(asked || apiKey.get());
}

function showKeyForm(message) {
  $("key-message").textContent = message;
  $("key").hidden = false;
  showKeyControls();
  $("key-input").focus();
}

async function loadModels() {
  if (loading) return;
  loading = true;
  try {
    models = (await getJSON("v1/models")).data.map((model) => model.id);
    $("model").replaceChildren(...models.map((id) => new Option(id, id)));
    $("model-choice").hidden = models.length < 2;
    $("key").hidden = true;
  } catch (error) {
    models = null;
    console.warn("v1/models:", failure(error));
  } finally {
    loading = false;
  }
}

function showTab() {
  const name = location.hash === "#race" ? "race" : "chat";
  for (const tab of ["chat", "race"]) {
    $(tab).hidden = tab !== name;
    $(`tab-${tab}`).setAttribute("aria-selected", String(tab === name));
  }
}

window.addEventListener("api-key-needed", () => {
  needsKey = true;
  asked = true;
  showKeyForm(apiKey.get()
    ? "The server did not accept this API key. Paste the right one."
    : "This server needs an API key. Paste it here: it stays in this tab only.");
});
$("key").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("key-input").value.trim();
  if (!key) { $("key-input").focus(); return; }
  apiKey.set(key);
  $("key-input").value = "";
  needsKey = false;
  showKeyControls();
  loadModels();
});
$("key-forget").addEventListener("click", () => {
  apiKey.set("");
  models = null;
  showKeyForm("Key forgotten. Paste a key to use one.");
});
$("key-toggle").addEventListener("click", () => {
  if ($("key").hidden) showKeyForm(apiKey.get() ? "A key is set for this tab." : "No key set.");
  else $("key").hidden = true;
});
window.addEventListener("hashchange", showTab);

showTab();
showKeyControls();
setupChat(currentModel);
setupRace(currentModel);
setupPanel(() => { if (!models && !needsKey) loadModels(); });
