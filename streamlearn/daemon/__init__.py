"""Always on: capture, a learner following its spool and the server, supervised by one daemon.

    streamlearn daemon --config configs/daemon.toml       (or python -m streamlearn.daemon)
    streamlearn status [--config FILE] [--json]
    streamlearn restore --backup DIR/backups/<backup>

supervisor.py runs the loop; children.py the processes; backup.py the backups;
guard.py decides when learning pauses; status.py says what is going on;
notify.py speaks systemd's notify protocol (configs/streamlearn.service).
"""
