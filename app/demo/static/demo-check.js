/* Says so when the demo's module scripts did not load (the page would otherwise just sit). */
window.addEventListener("load", function () {
  "use strict";
  if (document.body.getAttribute("data-ready") === "true") return;
  var error = document.getElementById("join-error");
  if (error) {
    error.textContent = "The chat library did not load, so the demo cannot connect. Reload " +
      "the page; if it keeps happening, the server is missing its JavaScript files (run " +
      "make install).";
  }
});
