// Fit wide display equations to their column: scale them down (to at most 60 %), then scroll if needed.
(function () {
  function fit() {
    document.querySelectorAll('mjx-container[display="true"]').forEach(function (eq) {
      eq.style.fontSize = "";
      eq.classList.remove("sb-scroll");
      var box = eq.parentElement, avail = box.clientWidth, need = eq.scrollWidth;
      var num = box.querySelector(".eqno");
      if (num) avail -= num.getBoundingClientRect().width;
      if (avail > 0 && need > avail + 1) {
        var scale = Math.max(0.6, (avail - 2) / need);
        eq.style.fontSize = (100 * scale).toFixed(1) + "%";
        if (eq.scrollWidth > avail + 1) eq.classList.add("sb-scroll");
      }
    });
  }
  function whenTypeset() {
    if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
      MathJax.startup.promise.then(function () { fit(); document.documentElement.dataset.sbMathFitted = "1"; });
    } else {
      setTimeout(whenTypeset, 50);
    }
  }
  window.addEventListener("load", whenTypeset);
  window.addEventListener("resize", fit);
})();
