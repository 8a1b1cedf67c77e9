"""(being written) native CPU kernel wrapper."""
def is_available(): return False
def build_error(): return "not written yet"
