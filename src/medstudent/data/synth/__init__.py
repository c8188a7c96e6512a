"""Procedural synthetic data in exactly the real on-disk layouts.

Real images cannot ship with the package or run in CI, so the demo and the tests use look-alikes written in
the same layouts the real data arrives in (STAS: `Train_Images/` + labelme `Train_Annotations/`; OCT2017:
`{train,val,test}/{CLASS}/{CLASS}-{PATIENT}-{k}.jpeg`). They are built to be learnable but not trivial:

- STAS (H&E lung tissue): the targets are clusters of atypical cells floating in air spaces. Clusters of the
  same cells attached to alveolar walls and dense lymphocyte aggregates share their colours and are not
  labelled, so a colour threshold fails and a model has to use context and morphology.
- OCT (retinal B-scans): four classes told apart by lesion shape (RPE bumps, cysts, sub-RPE mass), under
  speckle; `difficulty` makes lesions subtler and speckle heavier.

Only numpy/scipy/Pillow are used here, so this works without torch. Every image is drawn from its own
`numpy.random.default_rng([seed, ...])`, so a data set is byte-for-byte reproducible from its seed.
The generators live in `stas` and `oct`; their drawing primitives in `shapes`.
"""

from medstudent.data.synth.oct import OCT_CLASSES, render_oct, synth_oct
from medstudent.data.synth.stas import render_stas, synth_stas

__all__ = ["OCT_CLASSES", "render_oct", "render_stas", "synth_oct", "synth_stas"]
