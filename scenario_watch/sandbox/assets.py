"""Assets: their API answers with signed CDN URLs, downloads, direct base64 uploads, and the CDN's GET."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from scenario_watch.sandbox.account import Account
from scenario_watch.sandbox.images import dimensions, make_png, sniff_mime
from scenario_watch.sandbox.models import ApiError
from scenario_watch.sandbox.records import ME, OWNER, AssetRecord, CdnError, iso, ms

DIRECT_UPLOAD_LIMIT = 6 * 1024 * 1024
EXTENSIONS = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/gif": "gif",
    "image/webp": "webp",
    "image/tiff": "tiff",
}


class Assets(Account):
    """The asset endpoints and the CDN reads of asset bytes (thread-safe)."""

    def asset_bytes(self, asset_id: str) -> bytes:
        """The bytes the CDN serves for an asset (KeyError if unknown); drawn images are cached."""
        with self._lock:
            asset = self._assets[asset_id]
            if asset.data is not None:
                return asset.data
            image = self._images.get(asset_id)
            if image is None:
                image = self._images[asset_id] = make_png(asset.seed)
            return image

    def asset(self, asset_id: str) -> dict[str, Any]:
        """GET /v1/assets/{id}: the asset with a freshly signed CDN URL."""
        with self._lock:
            record = self._assets.get(asset_id)
            if record is None:
                raise ApiError(404, "Asset not found")
            data = self.asset_bytes(asset_id)
            url, _ = self._asset_url(record)
        width, height = dimensions(data)
        return {
            "asset": {
                "id": asset_id,
                "url": url,
                "mimeType": record.mime,
                "kind": "image",
                "status": "success",
                "source": record.source,
                "privacy": "private",
                "authorId": record.author,
                "ownerId": OWNER,
                "collectionIds": [],
                "tags": [],
                "editCapabilities": [],
                "properties": {"width": width, "height": height, "size": len(data)},
                "metadata": {"kind": "image", "type": record.source, **record.metadata},
                "createdAt": iso(ms(record.created)),
                "updatedAt": iso(ms(record.created)),
            }
        }

    def _asset_url(self, record: AssetRecord) -> tuple[str, int]:
        path = f"/assets/{record.asset_id}.{EXTENSIONS.get(record.mime, 'bin')}"
        return self.signer.sign(self.cdn_url, path, self.url_ttl)

    def download(self, asset_id: str, body: Any) -> dict[str, Any]:
        """POST /assets/{id}/download: a fresh signed URL; converting formats is not simulated."""
        target = body.get("targetFormat") if isinstance(body, dict) else None
        if target not in ("png", "jpeg", "webp"):
            raise ApiError(400, "targetFormat must be one of png, jpeg, webp")
        with self._lock:
            record = self._assets.get(asset_id)
            if record is None:
                raise ApiError(404, "Asset not found")
            if record.mime != f"image/{target}":
                raise ApiError(400, f"The sandbox cannot convert {record.mime} to {target}")
            url, _ = self._asset_url(record)
            return {"url": url, "mimeType": record.mime}

    def upload_asset(self, body: Any) -> dict[str, Any]:
        """POST /assets: a small image as bare base64 becomes an asset (and an upload job)."""
        if not isinstance(body, dict) or not isinstance(body.get("image"), str):
            raise ApiError(400, "image is required: the file as a bare base64 string")
        name = body.get("name", "")
        if not isinstance(name, str):
            raise ApiError(400, "name must be a string")
        if body["image"].startswith("data:"):
            raise ApiError(400, "image must be bare base64, without a data: URL prefix")
        try:
            data = base64.b64decode(body["image"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ApiError(400, "image is not valid base64") from exc
        if len(data) >= DIRECT_UPLOAD_LIMIT:
            raise ApiError(400, "image is 6 MB or larger: upload it in parts with /v1/uploads")
        mime = sniff_mime(data)
        if mime is None:
            raise ApiError(400, "image is not a supported format (jpeg, png, gif, webp, tiff)")
        with self._lock:
            asset_id = self._add_asset(data, mime, "", ME, name)
            self._upload_job(asset_id, ME)
        return self.asset(asset_id)

    def cdn_asset(self, path: str, query: dict[str, str]) -> tuple[str, bytes]:
        """A CDN GET: check the signature, then the MIME type and bytes."""
        self.signer.check(path, query)
        asset_id = path.removeprefix("/assets/").rsplit(".", 1)[0]
        with self._lock:
            record = self._assets.get(asset_id)
            if record is None:
                raise CdnError(404, "The specified key does not exist.")
            return record.mime, self.asset_bytes(asset_id)
