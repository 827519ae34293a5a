// Loaded before the stylesheet paints (not deferred): the chosen theme applies with no flash.
"use strict";
(function () {
  try {
    var saved = window.localStorage.getItem("console-theme");
    if (saved === "dark" || saved === "light") document.documentElement.setAttribute("data-theme", saved);
  } catch (e) { /* storage refused: follow the system */ }
})();
