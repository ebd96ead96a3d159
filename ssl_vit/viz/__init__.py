"""Pictures of what objectives do (written as PNG by ``python -m ssl_vit.viz.<name>``)."""
