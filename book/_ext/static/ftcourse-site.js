/* ftcourse site: the version switcher and the fitting of wide display equations.
   Loaded on every page by book/_ext/ftcourse_book.py. The site's versions are listed in versions.json at
   the site root, two folders above this script (<root>/v0.1.0/_static/ftcourse-site.js). */
(() => {
  "use strict";
  const script = document.currentScript;
  const here = script ? script.src : document.baseURI;
  const versionRoot = new URL("../", here).href;   // <root>/v0.1.0/ (or the build folder itself)
  const siteRoot = new URL("../../", here).href;   // <root>/
  const current = (window.DOCUMENTATION_OPTIONS && DOCUMENTATION_OPTIONS.VERSION) || "";

  function pagePath() {
    const url = window.location.href.split("#")[0].split("?")[0];
    return url.startsWith(versionRoot) ? url.slice(versionRoot.length) : "";
  }

  function switcher(versions) {
    const box = document.createElement("div");
    box.className = "ftcourse-versions";
    const label = document.createElement("label");
    label.textContent = "Version ";
    const select = document.createElement("select");
    select.setAttribute("aria-label", "Book version");
    const page = pagePath();
    const rows = [];
    for (const entry of versions) {
      rows.push({ label: entry.version + (entry.latest ? " (latest)" : ""), path: entry.path, version: entry.version });
    }
    for (const row of rows) {
      const option = document.createElement("option");
      option.value = new URL(row.path + page, siteRoot).href;
      option.textContent = row.label;
      option.dataset.version = row.version;
      if (row.version === current) option.selected = true;
      select.appendChild(option);
    }
    select.addEventListener("change", () => { window.location.href = select.value; });
    label.appendChild(select);
    box.appendChild(label);
    const place = document.querySelector(".bd-sidebar-primary .sidebar-primary-items__start")
      || document.querySelector(".bd-sidebar-primary") || document.querySelector("article") || document.body;
    place.prepend(box);
  }

  function loadVersions() {
    fetch(new URL("versions.json", siteRoot).href, { cache: "no-cache" })
      .then((r) => (r.ok ? r.json() : []))
      .then((versions) => { if (Array.isArray(versions) && versions.length) switcher(versions); })
      .catch(() => {});
  }

  /* MathJax 3 does not break lines. A display equation wider than the text column is set a little
     smaller, down to 80 % of the text size; what still does not fit keeps the theme's scrollbar. */
  const MIN_SCALE = 0.8;
  function mathWidth(container) {  // the typeset formula's own width, however its container is styled
    const inner = container.querySelector("mjx-math") || container;
    return Math.ceil(inner.getBoundingClientRect().width);
  }
  window.ftcourseMathWidth = mathWidth;  // for the site test's measurement
  function fitEquations() {
    for (const math of document.querySelectorAll('mjx-container[display="true"]')) {
      const column = math.clientWidth;  // the container spans the column; what overflows scrolls
      const width = mathWidth(math);
      if (!column || width <= column) continue;
      const scale = Math.max(MIN_SCALE, column / width);
      // MathJax sets the container's own font size (to match the text's x-height): scale that, not 1em.
      const size = parseFloat(getComputedStyle(math).fontSize);
      math.style.fontSize = (size * scale).toFixed(2) + "px";
      math.dataset.ftcourseScale = scale.toFixed(3);
    }
  }

  function whenTypeset(then) {
    if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
      MathJax.startup.promise.then(then);
    } else if (document.querySelector(".math")) {
      window.addEventListener("load", () => whenTypeset(then), { once: true });
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    loadVersions();
    whenTypeset(fitEquations);
  });
})();
