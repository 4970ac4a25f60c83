"""heatcrop sidecar: decides crop boxes for an existing image server."""
