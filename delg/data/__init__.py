"""Dataset readers: revisitop (ROxford/RParis), folders of your own photos, the embedded minibench, GLDv2."""
