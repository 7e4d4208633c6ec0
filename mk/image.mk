# The container image, built without a Docker engine (podman/buildah, runc), and what it needs.
#   make image        install podman & co. from Debian if missing, build the base from Debian
#                     packages (hack/image/base.sh, cached in /root/.cache/importwaves/image) and
#                     the image from the Dockerfile (hack/image/build.sh); warm: a no-op
#   make image-name   print the image's name
#   make lock         regenerate requirements/*.txt (the image's hashed lock files) with uv
TEST_PREREQS += image

.PHONY: image image-deps image-name lock

image-deps:
	@bash hack/image/deps.sh

image: image-deps
	@bash hack/image/build.sh >/dev/null

image-name:
	@bash hack/image/build.sh --digest | cut -d' ' -f1

lock: venv
	bash hack/image/lock.sh
