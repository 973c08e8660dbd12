"""The ``diffcr`` command-line application, apart from the library.

* :mod:`diffcr.app.cli`          the ``diffcr`` command (info, bench, train, inspect, generate);
* :mod:`diffcr.app.train`        ``diffcr train``: the embedded demo and fine-tuning on image
  folders;
* :mod:`diffcr.app.bench`        the benchmark harness (dense vs routed vs naive, interleaved);
* :mod:`diffcr.app.image_folder` reading and writing ImageFolder-style trees of user images;
* :mod:`diffcr.app.demo`         the demo's synthetic data set, classifier, metrics and plots.

The library (``diffcr`` config, convert, modules, fused path, io, training losses, CPU
prepacking, and ``diffcr_kernels``) never imports this package; it uses only the library's
public API.
"""
