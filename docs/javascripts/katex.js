// Render the formulas pymdownx.arithmatex leaves as \( ... \) and \[ ... \] in
// <span|div class="arithmatex"> with the KaTeX bundled under assets/katex (no CDN: the
// site works offline). document$ fires on every page load, including mkdocs-material's
// instant navigation.
document$.subscribe(({ body }) => {
  for (const element of body.querySelectorAll(".arithmatex")) {
    renderMathInElement(element, {
      delimiters: [
        { left: "\\(", right: "\\)", display: false },
        { left: "\\[", right: "\\]", display: true },
      ],
      throwOnError: false,
    });
  }
});
