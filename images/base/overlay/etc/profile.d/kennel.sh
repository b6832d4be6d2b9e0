# Kennel: the stack's environment, and start in the project.
if [ -r /etc/kennel/metadata.env ]; then
  set -a
  . /etc/kennel/metadata.env
  set +a
fi
if [ -r /etc/kennel/stack.env ]; then
  set -a
  . /etc/kennel/stack.env
  set +a
fi
# The repository's devcontainer.json remoteEnv/containerEnv.
if [ -r /etc/kennel/devcontainer.env ]; then
  . /etc/kennel/devcontainer.env
fi
if [ -n "${PS1:-}" ] && [ "$PWD" = "$HOME" ] && [ -d /workspace ]; then
  cd /workspace
fi
