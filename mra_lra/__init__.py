"""mra-lra: Long Range Arena with MRA attention."""
