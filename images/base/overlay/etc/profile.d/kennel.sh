# Kennel: the stack's environment, and start in the project.
if [ -r /etc/kennel/stack.env ]; then
  set -a
  . /etc/kennel/stack.env
  set +a
fi
if [ -n "${PS1:-}" ] && [ "$PWD" = "$HOME" ] && [ -d /workspace ]; then
  cd /workspace
fi
