"""Tools around the bundled demo model, run from the repository root and not shipped with the service:

    python -m demo.scenes      # synthetic scenes with exact object masks
    python -m demo.train       # train the demo model (`make train-demo`), saved to service/demo/shapes-vit
    python -m demo.evaluate    # quality report of the explanations on it (`make eval`), docs/eval/

The trained weights themselves live in service/demo/shapes-vit, inside the service package
(service.config.SHAPES_VIT), since the service loads them from there.
"""
