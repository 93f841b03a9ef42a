"""ShapeWorld: a fully verifiable CPU world of coloured shapes for the CLVR loop.

``world`` (classes, palette, scenes, error model), ``render`` (scene -> pixels), ``detect``
(pixels -> detections), ``language`` (GenEval prompts and edit instructions), ``executor`` (the
simulated generator) and ``controller`` (plans from text, judges from pixels).
"""
