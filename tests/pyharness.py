"""The runner of the Python test files of tests/ when pytest is not installed: calls each test
function, prints PASS / FAIL with the assertion's message, the notes, and a count; returns the
exit status (1 when a test failed)."""


def run(name, tests, notes=()):
    passed = failed = 0
    for t in tests:
        try:
            t()
        except AssertionError as e:
            failed += 1
            print(f"FAIL {t.__name__}: {e}")
        else:
            passed += 1
            print(f"PASS {t.__name__}")
    for note in notes:
        print(f"note: {note}")
    print(f"{name}: {passed} passed, {failed} failed")
    return 1 if failed else 0
