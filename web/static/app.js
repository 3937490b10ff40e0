// flagmatch viewer: reveal one thumbnail at a time (recorded), select-all, drop-to-search. No inline JS (CSP).
"use strict";
(function () {
  const csrf = () => document.querySelector('meta[name="csrf-token"]').content;

  document.addEventListener("click", async (ev) => {
    const btn = ev.target.closest("button.reveal");
    if (btn) {
      ev.preventDefault();
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
      return;
    }
    const all = ev.target.closest("button.select-all");
    if (all) {
      const boxes = all.closest("form").querySelectorAll("input.pick");
      const on = Array.from(boxes).some((b) => !b.checked);
      boxes.forEach((b) => { b.checked = on; });
    }
  });

  // a form is submitted once: a double click must not send the same decision twice
  document.addEventListener("submit", (ev) => {
    const form = ev.target;
    if (form.method.toLowerCase() !== "post") return;
    if (form.dataset.sent === "1") { ev.preventDefault(); return; }
    form.dataset.sent = "1";
    window.setTimeout(() => { form.dataset.sent = ""; }, 5000);  // a failed navigation may be retried
  });

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
