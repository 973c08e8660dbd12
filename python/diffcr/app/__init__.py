"""The ``diffcr`` command-line application, built on the library's public API.

Layers, each importing only the ones below it (the library never imports this package):

* :mod:`diffcr.app.cli`          the ``diffcr`` command, one module per command (info, bench,
  train, inspect, generate); ``diffcr train`` chooses the training mode here, once;
* runners, which never import each other: :mod:`diffcr.app.demo.run` (the embedded demo),
  :mod:`diffcr.app.classcond` (class-conditional DiTs on image folders),
  :mod:`diffcr.app.captioned` (captioned fine-tuning of pipeline folders, with a recipe per
  pipeline family in :mod:`diffcr.app.recipes`), :mod:`diffcr.app.generate` (sampling from
  pipelines), :mod:`diffcr.app.bench` (the benchmark harness);
* the training core: :mod:`diffcr.app.core` (progress, parameter groups, learning-rate
  schedule, EMA, the checkpoint writer), :mod:`diffcr.app.parallel` (single process / DDP /
  FSDP2 as one strategy), :mod:`diffcr.app.ddpm` (the class-conditional loop, loss and
  sampler);
* data: :mod:`diffcr.app.image_folder`, :mod:`diffcr.app.video`, the demo's data set, classifier
  and metrics in :mod:`diffcr.app.demo`;
* :mod:`diffcr.app.options`: the sectioned ``diffcr train`` config from which the command line
  is derived; :mod:`diffcr.app.bench_kinds`: the benchmarked block kinds (torch-free).
"""
