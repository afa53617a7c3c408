"""What a run prints: each warning once per run on every handler, no third-party adverts."""

import logging

from mra_lra.loggers import quiet_console


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_each_warning_once_per_run_on_every_handler():
    root = logging.getLogger()
    console, logfile = Collect(), Collect()
    root.addHandler(console)
    root.addHandler(logfile)
    try:
        log = logging.getLogger("mra_lra.data.somewhere")
        for _ in range(2):  # two runs in one process (a sweep)
            with quiet_console():
                for _ in range(3):  # set up for fit, validate and test
                    log.warning("no release under data/: generated set used")
                logging.getLogger("pytorch_lightning.utilities.rank_zero").warning("try litlogger")
        log.warning("no release under data/: generated set used")  # outside a run: as it is
    finally:
        root.removeHandler(console)
        root.removeHandler(logfile)
    for handler in (console, logfile):
        assert handler.messages.count("no release under data/: generated set used") == 3
        assert not any("litlogger" in m for m in handler.messages)
