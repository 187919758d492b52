// The console's behaviour on every page: the API-key gate, the key on every request, and
// small helpers (copy, clear). No inline scripts: the pages run under a strict CSP.
"use strict";

(function () {
  const STORE = "mlx-manager-key";
  const key = () => sessionStorage.getItem(STORE);

  function authHeaders() {
    const k = key();
    return k ? { Authorization: "Bearer " + k } : {};
  }
  // The chat page sends its own requests with fetch.
  window.mlxConsole = { authHeaders };

  function showGate(message) {
    document.getElementById("main").hidden = true;
    const gate = document.getElementById("gate");
    gate.hidden = false;
    const error = document.getElementById("gate-error");
    error.textContent = message || "";
    error.hidden = !message;
    document.getElementById("gate-key").focus();
  }

  let started = false;
  function start() {
    document.getElementById("gate").hidden = true;
    const main = document.getElementById("main");
    main.hidden = false;
    if (started) return;
    started = true;
    main.appendChild(document.getElementById("content").content.cloneNode(true));
    htmx.process(main);
    document.dispatchEvent(new CustomEvent("console:ready"));
  }

  async function check(fromGate) {
    let response;
    try {
      response = await fetch("/console/auth", { headers: authHeaders() });
    } catch (e) {
      showGate("The server cannot be reached.");
      return;
    }
    if (response.status === 204) {
      start();
      return;
    }
    let reason = "";
    try {
      reason = (await response.json()).error.message;
    } catch (e) {
      reason = "HTTP " + response.status;
    }
    if (response.status === 401) {
      if (key()) {
        sessionStorage.removeItem(STORE);
        showGate("That API key was refused: " + reason);
      } else {
        showGate(fromGate ? reason : "");
      }
    } else {
      showGate("The server refused the console: " + reason);
    }
  }

  document.addEventListener("htmx:configRequest", (event) => {
    Object.assign(event.detail.headers, authHeaders());
  });

  // A poll that brings back what is already shown leaves the page alone: focus, selection
  // and the button under the pointer stay.
  document.addEventListener("htmx:beforeSwap", (event) => {
    const target = event.detail.target;
    const xhr = event.detail.xhr;
    if (xhr.status === 401) {
      event.detail.shouldSwap = false;
      sessionStorage.removeItem(STORE);
      showGate("This server now needs an API key.");
      return;
    }
    if (target && target.dataset.shown === xhr.responseText && target.childElementCount) {
      event.detail.shouldSwap = false;
    } else if (target && target.hasAttribute("hx-trigger")) {
      target.dataset.shown = xhr.responseText;
    }
  });

  // The first key made from the console becomes this session's key: the server asks for
  // one from now on.
  document.addEventListener("htmx:afterSwap", (event) => {
    const created = event.detail.target.querySelector("#new-key");
    if (created && !key()) sessionStorage.setItem(STORE, created.value);
  });

  document.addEventListener("click", async (event) => {
    const copy = event.target.closest("[data-copy]");
    if (copy) {
      const field = document.querySelector(copy.dataset.copy);
      field.select();
      try {
        await navigator.clipboard.writeText(field.value);
        copy.textContent = "Copied";
      } catch (e) {
        copy.textContent = "Press Ctrl+C";
      }
    }
    const clear = event.target.closest("[data-clear]");
    if (clear) document.querySelector(clear.dataset.clear).replaceChildren();
  });

  document.addEventListener("DOMContentLoaded", () => {
    document.getElementById("gate-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = document.getElementById("gate-key").value.trim();
      if (!value) return;
      sessionStorage.setItem(STORE, value);
      check(true);
    });
    check(false);
  });
})();
