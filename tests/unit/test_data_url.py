"""IMAGE elements as base64 data: URLs (KServe v2 JSON requests)."""

import base64

import pytest

from mm_models.data_url import unwrap_data_url

PNG = b"\x89PNG\r\n\x1a\n rest"


def test_raw_bytes_pass_through_and_data_urls_unwrap():
    assert unwrap_data_url(PNG, 0) is PNG
    assert unwrap_data_url(b"data:image/png;base64," + base64.b64encode(PNG), 0) == PNG
    assert unwrap_data_url(b"DATA:image/jpeg;BASE64," + base64.b64encode(PNG), 0) == PNG


@pytest.mark.parametrize(
    "bad, match",
    [
        (b"data:image/png,raw", "must be data:"),
        (b"data:image/png;base64", "must be data:"),
        (b"data:image/png;base64,***", "not valid base64"),
    ],
)
def test_malformed_data_urls_name_the_image(bad, match):
    with pytest.raises(ValueError, match=rf"IMAGE\[3\]: .*{match}"):
        unwrap_data_url(bad, 3)
