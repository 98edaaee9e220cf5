import hashlib
import hmac

import pytest

from dtrain import _C


@pytest.mark.parametrize("key", ["", "k", "a" * 64, "b" * 65, "job-token-" * 20])
@pytest.mark.parametrize("msg", [b"", b"abc", bytes(range(256)) * 3, b"x" * 55, b"y" * 56, b"z" * 64])
def test_hmac_sha256_matches_python(key, msg):
    assert _C.hmac_sha256(key, msg) == hmac.new(key.encode(), msg, hashlib.sha256).digest()
