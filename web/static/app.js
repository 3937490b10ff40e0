// flagmatch viewer: reveal one thumbnail at a time (recorded), selections that survive paging, keyboard
// review, decisions and flag changes in place, a request id on every form (the server acts on it once),
// forms kept across an ended session, drop-to-search. No inline JS (CSP), no build step.
"use strict";
(function () {
  const csrf = () => document.querySelector('meta[name="csrf-token"]').content;
  const $$ = (sel, root) => Array.from((root || document).querySelectorAll(sel));

  function newId() {
    const b = new Uint8Array(16);
    crypto.getRandomValues(b);
    return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  }

  function say(message, kind) {
    const box = document.getElementById("flashes");
    if (!box) return;
    const p = document.createElement("p");
    p.className = kind === "error" ? "flash error" : "flash";
    p.textContent = message;
    box.replaceChildren(p);
  }

  // ---------------------------------------------------------------- request ids: one action per form
  function hiddenField(form, name) {  // the form's hidden input of that name, made when missing
    let input = form.querySelector(`input[type="hidden"][name="${name}"]`);
    if (!input) {
      input = document.createElement("input");
      input.type = "hidden";
      input.name = name;
      form.appendChild(input);
    }
    return input;
  }
  function stamp(form) {
    hiddenField(form, "request_id").value = newId();
  }
  $$('form[method="post"]').forEach(stamp);

  // ---------------------------------------------------------------- selection (kept per page across paging)
  const selForm = document.querySelector("form[data-selection]");
  const selKey = selForm ? "flagmatch-selection:" + selForm.dataset.selection : null;
  let selected = new Set();
  if (selKey && selForm.dataset.selection !== "search") {
    try { selected = new Set(JSON.parse(sessionStorage.getItem(selKey) || "[]")); } catch (e) { selected = new Set(); }
  }
  function shownSelection() {  // the selected ids a filter does not hide: what an action applies to
    const hiddenIds = new Set($$(".card.image[hidden] input.pick").map((b) => b.value));
    return Array.from(selected).filter((i) => !hiddenIds.has(i));
  }
  function saveSelection() {
    if (selKey) sessionStorage.setItem(selKey, JSON.stringify(Array.from(selected)));
    const shown = shownSelection().length;
    $$(".selected-count").forEach((el) => {
      el.textContent = shown === selected.size ? selected.size + " selected"
        : shown + " selected shown (" + (selected.size - shown) + " more selected, hidden by the filter: actions apply to the shown)";
    });
    $$("input.pick").forEach((b) => { b.checked = selected.has(b.value); });
  }
  if (selForm && selForm.dataset.preselect === "1") {  // a map selection arrives ticked
    $$("input.pick", selForm).forEach((b) => selected.add(b.value));
  }
  // the selection page's filters: hide what does not match; the selection stays (the count says how much is hidden)
  function applyFilters() {
    const state = document.getElementById("filter-state"), cl = document.getElementById("filter-cluster");
    if (!state || !cl) return;
    $$(".card.image").forEach((c) => {
      c.hidden = !((!state.value || c.classList.contains(state.value)) && (!cl.value || c.dataset.cluster === cl.value));
    });
    saveSelection();
  }
  ["filter-state", "filter-cluster"].forEach((id) => {
    const el = document.getElementById(id);
    if (el) el.addEventListener("change", applyFilters);
  });
  const every = document.querySelector("button.select-every");
  if (every && selForm && selForm.dataset.allUrl) {
    every.hidden = false;
    every.textContent = "Select all " + selForm.dataset.total;
  }
  saveSelection();

  let lastPick = null;
  document.addEventListener("click", (ev) => {
    const box = ev.target.closest("input.pick");
    if (!box) return;
    const boxes = $$("input.pick");
    if (ev.shiftKey && lastPick !== null) {  // a range: everything between the last box and this one
      const a = boxes.indexOf(lastPick), b = boxes.indexOf(box);
      boxes.slice(Math.min(a, b), Math.max(a, b) + 1).forEach((x) => {
        if (box.checked) selected.add(x.value); else selected.delete(x.value);
      });
    } else if (box.checked) {
      selected.add(box.value);
    } else {
      selected.delete(box.value);
    }
    lastPick = box;
    saveSelection();
  });

  // ---------------------------------------------------------------- clicks: reveal, select page / all / none
  async function reveal(btn) {
    btn.disabled = true;
    const resp = await fetch(btn.dataset.url, {method: "POST", headers: {"X-CSRF-Token": csrf()},
                                               credentials: "same-origin"});
    if (resp.ok) {
      const {url} = await resp.json();
      const img = btn.closest("figure").querySelector("img");
      img.src = url;
      img.classList.remove("blurred");
      img.classList.add("revealed");
      btn.remove();
    } else {
      btn.disabled = false;
    }
  }

  document.addEventListener("click", async (ev) => {
    const btn = ev.target.closest("button.reveal");
    if (btn) { ev.preventDefault(); await reveal(btn); return; }
    if (ev.target.closest("button.select-all")) {
      const boxes = $$("input.pick").filter((b) => !b.closest(".card").hidden);
      const on = boxes.some((b) => !selected.has(b.value));
      boxes.forEach((b) => { if (on) selected.add(b.value); else selected.delete(b.value); });
      saveSelection();
      return;
    }
    if (ev.target.closest("button.select-none")) { selected.clear(); saveSelection(); return; }
    if (ev.target.closest("button.select-every")) {
      const resp = await fetch(selForm.dataset.allUrl, {credentials: "same-origin"});
      if (resp.ok) {
        (await resp.json()).ids.forEach((i) => selected.add(String(i)));
        saveSelection();
      }
    }
  });

  // ---------------------------------------------------------------- preferences in place (no navigation:
  // search results and a posted selection stay on screen)
  async function signedOut(resp) {  // the session ended: the server kept the form; sign in and it comes back
    if (resp.status !== 401) return false;
    const data = await resp.clone().json().catch(() => ({}));
    if (data.error && data.error.login_url) { location.href = data.error.login_url; return true; }
    return false;
  }

  async function post(form, submitter) {
    const body = new FormData(form);
    if (submitter && submitter.name) body.set(submitter.name, submitter.value);
    body.set("return_to", location.pathname + location.search);  // (pages send no Referer) where sign-in comes back to
    const action = (submitter && submitter.getAttribute("formaction")) || form.action;
    const resp = await fetch(action, {method: "POST", body, credentials: "same-origin",
                                      headers: {"X-Requested-With": "fetch", "X-CSRF-Token": csrf()}});
    stamp(form);  // the next submit is a new action
    if (await signedOut(resp)) return new Promise(() => {});  // navigating away: nothing more to do here
    return resp;
  }

  function refreshThumbs(blur, grey) {
    document.body.classList.toggle("grey", grey);
    $$("button.reveal").forEach((b) => { b.hidden = !blur; });  // nothing to reveal while blur is off
    $$("figure.thumb img").forEach((img) => {
      if (img.classList.contains("revealed") || img.src.startsWith("data:")) return;
      const u = new URL(img.src, location.href);
      u.searchParams.set("v", Date.now());
      img.src = u.toString();
      img.classList.toggle("blurred", blur);
    });
  }

  const strength = document.querySelector("select.blur-strength");
  if (strength) {
    strength.addEventListener("change", async () => {
      const form = strength.form;
      const body = new FormData();
      body.set("csrf", csrf());
      body.set("blur_strength", strength.value);
      const resp = await fetch(form.action, {method: "POST", body, credentials: "same-origin",
                                             headers: {"X-Requested-With": "fetch", "X-CSRF-Token": csrf()}});
      if (resp.ok) {
        const blurBtn = form.querySelector('button[name="blur"]');
        const greyBtn = form.querySelector('button[name="grey"]');
        refreshThumbs(blurBtn.value === "off", greyBtn.value === "off");
      }
    });
  }

  // ---------------------------------------------------------------- flag changes in place, and their undo
  const CONFIRM_FROM = 20;  // a bulk change of this many images or more asks first
  function showFlags(ids, flagged) {
    ids.forEach((id) => {
      const card = document.querySelector(`.card[data-id="${id}"]`);
      if (!card) return;
      card.classList.toggle("is-flagged", flagged);
      card.classList.toggle("is-unflagged", !flagged);
      const st = card.querySelector(".flagstate");
      if (st) {
        st.className = "flagstate " + (flagged ? "flagged" : "unflagged");
        st.textContent = flagged ? "flagged · review" : "not flagged";
      }
    });
  }
  function offerUndo(url) {  // an Undo button in the message: the change it reports, reversed, in one click
    const p = document.querySelector("#flashes .flash");
    if (!p) return;
    const b = document.createElement("button");
    b.type = "button";
    b.className = "undo-change";
    b.textContent = "Undo";
    p.append(" ", b);
    b.addEventListener("click", async () => {
      b.disabled = true;
      const body = new FormData();
      body.set("csrf", csrf());
      body.set("request_id", newId());
      const resp = await fetch(url, {method: "POST", body, credentials: "same-origin",
                                     headers: {"X-Requested-With": "fetch", "X-CSRF-Token": csrf()}});
      if (await signedOut(resp)) return;
      const data = await resp.json().catch(() => ({}));
      if (!resp.ok) { say((data.error && data.error.message) || "That did not work.", "error"); return; }
      showFlags(data.changed, data.flagged);
      say(data.message);
    });
  }

  async function sendInPlace(form, submitter) {  // one in-place submit: its JSON answer, or null (said why)
    form.dataset.sent = "1";
    const resp = await post(form, submitter);
    form.dataset.sent = "";
    const data = await resp.json().catch(() => ({}));
    if (!resp.ok) { say((data.error && data.error.message) || "That did not work.", "error"); return null; }
    return data;
  }

  // ---------------------------------------------------------------- submits
  document.addEventListener("submit", async (ev) => {
    const form = ev.target;
    if (form.method.toLowerCase() !== "post") return;
    if (form.dataset.sent === "1") { ev.preventDefault(); return; }  // a double click is one submit
    const submitter = ev.submitter;

    if (form.classList.contains("prefs")) {
      ev.preventDefault();
      const resp = await post(form, submitter);
      if (resp.ok || resp.redirected) {
        const blurBtn = form.querySelector('button[name="blur"]');
        const greyBtn = form.querySelector('button[name="grey"]');
        if (submitter === blurBtn) {
          const nowBlur = blurBtn.value === "on";
          blurBtn.value = nowBlur ? "off" : "on";
          blurBtn.textContent = "Blur: " + (nowBlur ? "on" : "off");
        } else if (submitter === greyBtn) {
          const nowGrey = greyBtn.value === "on";
          greyBtn.value = nowGrey ? "off" : "on";
          greyBtn.textContent = "Greyscale: " + (nowGrey ? "on" : "off");
        }
        refreshThumbs(blurBtn.value === "off", greyBtn.value === "off");
      }
      return;
    }

    const formaction = submitter && submitter.getAttribute("formaction");
    const isFlagAction = formaction && /\/images\/(un)?flag$/.test(formaction);
    if (isFlagAction) {
      ev.preventDefault();
      const fixed = form.querySelector('input[type="hidden"][name="ids"]:not([data-from-selection])');
      const ids = fixed ? fixed.value.split(",").filter(Boolean) : shownSelection();
      if (!ids.length) { say("Select at least one image first.", "error"); return; }
      const verb = /unflag$/.test(formaction) ? "Unflag" : "Flag";
      if (ids.length >= CONFIRM_FROM && !window.confirm(verb + " " + ids.length + " images?")) return;
      const reason = form.querySelector('input[name="reason"]');
      if (reason && reason.required && !reason.value.trim()) {
        say("Give a reason first.", "error");
        reason.focus();
        return;
      }
      let hidden = null;
      if (!fixed) {
        $$('input.pick', form).forEach((b) => { b.disabled = true; });  // the ids travel in one field
        hidden = hiddenField(form, "ids");
        hidden.dataset.fromSelection = "1";
        hidden.value = ids.join(",");
      }
      form.dataset.sent = "1";
      const resp = await post(form, submitter);
      form.dataset.sent = "";
      $$('input.pick', form).forEach((b) => { b.disabled = false; });
      if (hidden) hidden.remove();
      const data = await resp.json().catch(() => ({}));
      if (!resp.ok) { say((data.error && data.error.message) || "That did not work.", "error"); return; }
      if (fixed) { location.reload(); return; }  // an image's page: its flag, history and neighbours change
      showFlags(data.changed, data.flagged);
      say(data.message);
      if (data.undo_url) offerUndo(data.undo_url);
      ids.forEach((id) => selected.delete(String(id)));
      saveSelection();
      if (reason) reason.value = "";
      return;
    }

    if (form.id === "decision-form") {
      ev.preventDefault();
      const data = await sendInPlace(form, submitter);
      if (!data) return;
      if (data.next_url && form.querySelector('input[name="next"]').checked) { location.href = data.next_url; return; }
      say(data.message);
      const st = document.getElementById("cluster-status");
      if (st) st.textContent = data.status;
      const by = document.getElementById("reviewed-by");
      if (by) by.textContent = data.reviewed_by ? " by " + data.reviewed_by : "";
      const h1 = document.querySelector("h1 .name");
      if (h1) h1.textContent = data.name || "unnamed";
      const undoForm = document.getElementById("undo-form");
      if (undoForm) undoForm.hidden = false;
      showFlags(data.unflagged, false);
      return;
    }

    if (form.id === "undo-form") {
      ev.preventDefault();
      if (await sendInPlace(form, submitter)) location.reload();  // its flags, status and decisions list change
      return;
    }

    form.dataset.sent = "1";
    window.setTimeout(() => { form.dataset.sent = ""; }, 5000);  // a failed navigation may be retried
  });

  // ---------------------------------------------------------------- the review queue: one verdict per card
  const queue = document.querySelector(".grid.queue");
  async function verdict(card, positive) {
    if (!card || card.classList.contains("done")) return;
    const body = new FormData();
    body.set("csrf", csrf());
    body.set("request_id", newId());
    body.set("image_id", card.dataset.id);
    body.set("label", card.dataset.label);
    body.set("positive", positive ? "1" : "0");
    const resp = await fetch(queue.dataset.verdictUrl, {method: "POST", body, credentials: "same-origin",
                                                        headers: {"X-Requested-With": "fetch", "X-CSRF-Token": csrf()}});
    if (await signedOut(resp)) return;
    const data = await resp.json().catch(() => ({}));
    if (!resp.ok) { say((data.error && data.error.message) || "That did not work.", "error"); return; }
    card.classList.add("done");
    card.classList.toggle("is-flagged", data.flagged);
    card.classList.toggle("is-unflagged", !data.flagged);
    const st = card.querySelector(".flagstate");
    if (st) { st.className = "flagstate " + (data.flagged ? "flagged" : "unflagged"); st.textContent = (positive ? "confirmed " : "dismissed ") + data.label; }
    say("#" + data.image_id + ": " + (positive ? "confirmed " : "not ") + data.label + ".");
  }
  if (queue) {
    queue.addEventListener("click", (ev) => {
      const b = ev.target.closest("button.verdict");
      if (b) verdict(b.closest(".card"), b.dataset.positive === "1");
    });
  }

  // ---------------------------------------------------------------- keyboard review
  const cards = () => $$(".card.image");
  let cursor = -1;
  function focusCard(i) {
    const all = cards();
    if (!all.length) return;
    cursor = Math.max(0, Math.min(all.length - 1, i));
    all.forEach((c) => c.classList.remove("cursor"));
    all[cursor].classList.add("cursor");
    all[cursor].scrollIntoView({block: "nearest"});
    const pick = all[cursor].querySelector("input.pick");
    if (pick) pick.focus({preventScroll: true});
    else if (all[cursor].tabIndex >= 0) all[cursor].focus({preventScroll: true});
  }
  document.addEventListener("keydown", (ev) => {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const t = ev.target;
    if (t.matches && t.matches("input[type=text], input[type=number], textarea, select")) return;
    const all = cards();
    if (ev.key === "j") { focusCard(cursor + 1); ev.preventDefault(); }
    else if (ev.key === "k") { focusCard(cursor - 1); ev.preventDefault(); }
    else if (ev.key === "x" && all[cursor]) {
      const pick = all[cursor].querySelector("input.pick");
      if (pick) pick.click();
      ev.preventDefault();
    } else if (ev.key === "r" && all[cursor]) {
      const btn = all[cursor].querySelector("button.reveal");
      if (btn) reveal(btn);
      ev.preventDefault();
    } else if (ev.key === "u") {
      const reason = selForm && selForm.querySelector('input[name="reason"]');
      if (reason) { reason.focus(); ev.preventDefault(); }
    } else if (queue && (ev.key === "c" || ev.key === "d") && all[cursor]) {
      verdict(all[cursor], ev.key === "c");
      focusCard(cursor + 1);
      ev.preventDefault();
    } else if (ev.key === "c") {
      const d = document.querySelector('#decision-form select[name="reason_code"]');
      if (d) { d.focus(); ev.preventDefault(); }
    }
  });

  // ---------------------------------------------------------------- a form the ended session was sending
  const pending = document.getElementById("pending-form");
  if (pending) {
    try {
      const p = JSON.parse(pending.textContent);
      const form = $$('form[method="post"]').find((f) => new URL(f.action, location.href).pathname === p.action) ||
        $$("form").find((f) => $$("button[formaction]", f).some((b) => new URL(b.getAttribute("formaction"), location.href).pathname === p.action));
      if (form) {
        Object.entries(p.fields || {}).forEach(([k, v]) => {
          const el = form.querySelector(`[name="${CSS.escape(k)}"]`);
          if (el && el.type !== "hidden" && el.type !== "checkbox") el.value = v;
        });
        (p.ids || []).forEach((v) => String(v).split(",").forEach((i) => { if (i) selected.add(i.trim()); }));
        saveSelection();
      }
    } catch (e) { /* a stale or foreign blob: nothing to restore */ }
  }

  // ---------------------------------------------------------------- drop to search
  const zone = document.getElementById("search-form");
  if (zone) {
    const input = document.getElementById("search-file");
    ["dragenter", "dragover"].forEach((t) => zone.addEventListener(t, (e) => { e.preventDefault(); zone.classList.add("over"); }));
    ["dragleave", "drop"].forEach((t) => zone.addEventListener(t, () => zone.classList.remove("over")));
    zone.addEventListener("drop", (e) => {
      e.preventDefault();
      if (e.dataTransfer.files.length) {
        input.files = e.dataTransfer.files;
        zone.submit();
      }
    });
  }
})();
