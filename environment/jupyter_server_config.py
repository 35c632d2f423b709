# JupyterLab settings for the Docker image only: the Dockerfile copies this file to
# /etc/jupyter/, where every Jupyter server in the image reads it. Outside the image
# environment/lab.sh keeps Jupyter's defaults (localhost only).
c = get_config()  # noqa: F821 (provided by Jupyter when it loads this file)

# Reachable through `docker run -p 8888:8888`: listen on every interface of the container.
c.ServerApp.ip = "0.0.0.0"
c.ServerApp.port = 8888
c.ServerApp.open_browser = False
# The container runs as root (its home holds the evcxr build caches warmed at build time).
c.ServerApp.allow_root = True
# Access stays protected by the token Jupyter prints at start (URL with ?token=...).
c.ServerApp.root_dir = "/opt/overopt/notebooks"
