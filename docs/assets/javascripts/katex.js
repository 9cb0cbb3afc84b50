// The pages' formulas (pymdownx.arithmatex, generic mode) rendered by the KaTeX that the site
// serves itself (docs/assets/katex, KaTeX 0.16, MIT licence): nothing loads from elsewhere,
// and the formulas render offline and from disk. Material's document$ fires for every page.
document$.subscribe(({ body }) => {
  renderMathInElement(body, {
    delimiters: [
      { left: "\\(", right: "\\)", display: false },
      { left: "\\[", right: "\\]", display: true },
    ],
    throwOnError: false,
  });
});
