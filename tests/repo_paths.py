"""Paths the tests share: the checkout, its test data and benches, and the optional ../shared folder."""
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_DATA = os.path.join(REPO, "test_data")
BENCH = os.path.join(REPO, "bench")
SHARED = os.path.join(REPO, "..", "shared")
