/* A UDP echo server with identity, for the test backend image (busybox has no UDP server):
 * `udp-echo PORT NAME` answers each datagram on PORT with "Hi from NAME" and the datagram itself on the next
 * line, so that a client sees which backend its flow reached. Built static: the image has no libc. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s PORT NAME\n", argv[0]);
        return 2;
    }
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    if (fd < 0 || bind(fd, (struct sockaddr *)&address, sizeof address) < 0) {
        perror("udp-echo");
        return 1;
    }
    char reply[65536];
    int head = snprintf(reply, sizeof reply, "Hi from %s\n", argv[2]);
    for (;;) {
        struct sockaddr_in peer;
        socklen_t peer_len = sizeof peer;
        ssize_t got = recvfrom(fd, reply + head, sizeof reply - head, 0, (struct sockaddr *)&peer, &peer_len);
        if (got >= 0)
            sendto(fd, reply, head + got, 0, (struct sockaddr *)&peer, peer_len);
    }
}
