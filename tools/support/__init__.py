"""What the commands, the harness and the tests share, written once.

* ``procs`` -- child processes: ``Process`` (start, wait for a port, a line or a log pattern, stop with SIGTERM
  then SIGKILL, die with the parent), ``micropython_binary``, ``free_port``, ``ida_command``.
* ``console/`` -- the firmware's console: ``DeviceConsole`` over a serial port or a process's pipes, the line
  parser, transcripts, ``ConsoleProcess`` (a simulated device with its console).
* ``mosquitto`` -- a throwaway Mosquitto: its config and its start.
* ``lifecycle`` -- what ``with`` does, written once: ``Closable`` (closes at the end), ``Startable`` (starts,
  then stops).
* ``tasks`` -- ``TaskSet``: the tasks an object runs beside its main work, cancelled together.
* ``boards`` -- the board files (``boards/*.json``), validated against their schema.
"""
