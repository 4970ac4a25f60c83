"""nginx configuration of the heatcrop edge: templates, renderer, and the local stack."""
